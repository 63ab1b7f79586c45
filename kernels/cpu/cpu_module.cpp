// hybrimoe._cpu: quantized GEMM and fused MoE expert FFN on raw GGUF blocks, on CPU.
//
//   tier selection (run time, CPUID)  ->  activation quantization (per token, per format)
//   -> row kernels of the tier (cpu_kernels.h)  -> persistent pool (pool.h)
//
// The Python face is hybrimoe/cpu.py, which validates inputs (KernelInputError) and passes raw
// pointers; the checks here are the last line (ValueError) and the token-id range check, which
// runs inside the job (so an async job reports it at wait()).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention.h"
#include "blocks.h"
#include "cpu_kernels.h"
#include "job.h"
#include "pool.h"

namespace py = pybind11;

namespace hybrimoe {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------- tiers ---

struct CpuFeatures {
    bool avx2 = false, avx512 = false, vnni = false;
};

CpuFeatures detect() {
    CpuFeatures f;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    f.vnni = f.avx512 && __builtin_cpu_supports("avx512vnni");
#endif
    return f;
}

const CpuFeatures& features() {
    static const CpuFeatures f = detect();
    return f;
}

std::vector<std::string> available_tiers() {
    std::vector<std::string> t = {"ref", "generic"};
    if (features().avx512) t.push_back("avx512");
    return t;
}

// Testing aids: run the code a CPU without AVX2 (generic) or without VNNI (avx512) would run.
std::atomic<bool> g_generic_scalar{false};
std::atomic<bool> g_avx512_no_vnni{false};

const TierOps* ops_for(const std::string& name) {
    if (name == "ref") return &ref_ops();
#if defined(__x86_64__) || defined(_M_X64)
    if (name == "generic") return features().avx2 && !g_generic_scalar ? &generic_avx2_ops() : &generic_scalar_ops();
    if (name == "avx512" && features().avx512) return features().vnni && !g_avx512_no_vnni ? &avx512_vnni_ops() : &avx512_ops();
#else
    if (name == "generic") return &generic_scalar_ops();
#endif
    return nullptr;
}

std::string best_tier() {
    const char* env = std::getenv("HYBRIMOE_CPU_TIER");
    if (env && ops_for(env)) return env;
    return features().avx512 ? "avx512" : "generic";
}

std::mutex g_tier_mu;
std::string g_tier_name;  // guarded by g_tier_mu

std::string current_tier() {
    std::lock_guard<std::mutex> lk(g_tier_mu);
    if (g_tier_name.empty()) g_tier_name = best_tier();
    return g_tier_name;
}

const TierOps* current_ops() { return ops_for(current_tier()); }

void set_tier(const std::string& name) {
    if (!ops_for(name)) {
        std::string avail;
        for (auto& t : available_tiers()) avail += (avail.empty() ? "" : ", ") + t;
        throw std::invalid_argument("set_tier: tier '" + name + "' is not available on this CPU (available: " +
                                    avail + ")");
    }
    std::lock_guard<std::mutex> lk(g_tier_mu);
    g_tier_name = name;
}

// ------------------------------------------------------------------- pool and async driver ---

struct AsyncState {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::exception_ptr err;
};

// One context per process, deliberately never destroyed: its threads must not be joined during
// interpreter teardown (static destructors run after Python is gone).
class Context {
   public:
    Context() : n_threads_(physical_cores()) {}

    // Every kernel call runs entirely under run_mu_, so calls (sync or async) never interleave and
    // the scratch arenas below can be shared.
    std::mutex run_mu_;
    ThreadPool& pool() {
        if (!pool_ || pool_->size() != n_threads_) {
            pool_.reset();
            pool_.reset(new ThreadPool(n_threads_));
        }
        return *pool_;
    }
    int n_threads_;

    void submit(std::function<void()> job, std::shared_ptr<AsyncState> st) {
        {
            std::lock_guard<std::mutex> lk(q_mu_);
            if (!driver_.joinable()) driver_ = std::thread([this] { drive(); });
            queue_.emplace_back(std::move(job), std::move(st));
        }
        q_cv_.notify_one();
    }

    // Scratch reused across calls (grown, never shrunk).
    std::vector<uint8_t> xq[N_ACTS];
    std::vector<uint8_t> hq;
    std::vector<const void*> ptrs;

   private:
    void drive() {
        for (;;) {
            std::pair<std::function<void()>, std::shared_ptr<AsyncState>> item;
            {
                std::unique_lock<std::mutex> lk(q_mu_);
                q_cv_.wait(lk, [&] { return !queue_.empty(); });
                item = std::move(queue_.front());
                queue_.pop_front();
            }
            std::exception_ptr err;
            try {
                item.first();
            } catch (...) {
                err = std::current_exception();
            }
            item.first = nullptr;  // drop captured state before signalling
            {
                std::lock_guard<std::mutex> lk(item.second->m);
                item.second->err = err;
                item.second->done = true;
            }
            item.second->cv.notify_all();
        }
    }

    std::unique_ptr<ThreadPool> pool_;
    std::mutex q_mu_;
    std::condition_variable q_cv_;
    std::deque<std::pair<std::function<void()>, std::shared_ptr<AsyncState>>> queue_;
    std::thread driver_;
};

Context& ctx() {
    static Context* c = new Context();  // leaked on purpose, see Context
    return *c;
}

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, found " + std::to_string(n));
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lk(ctx().run_mu_);
    ctx().n_threads_ = n;
}

int num_threads() { return ctx().n_threads_; }

// ------------------------------------------------------------------------- shared pieces ---

std::string qtype_name(int qtype) {
    switch (qtype) {
        case (int)QType::Q4_K: return "Q4_K";
        case (int)QType::Q6_K: return "Q6_K";
        case (int)QType::Q5_0: return "Q5_0";
        case (int)QType::Q8_0: return "Q8_0";
        default: return "type " + std::to_string(qtype);
    }
}

void check_matrix(const char* what, int qtype, int cols) {
    if (type_slot(qtype) < 0)
        throw std::invalid_argument(std::string(what) + ": quant type " + std::to_string(qtype) +
                                    " is not supported (expected Q4_K, Q6_K, Q5_0 or Q8_0)");
    const int be = block_elems(qtype);
    if (cols <= 0 || cols % be)
        throw std::invalid_argument(std::string(what) + ": row length " + std::to_string(cols) + " is not a multiple of " +
                                    qtype_name(qtype) + "'s block size " + std::to_string(be));
}

size_t row_bytes(int qtype, int cols) { return (size_t)(cols / block_elems(qtype)) * block_bytes(qtype); }

inline float bf16_to_float(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Quantize rows [0, T) of x (T, n; float32 or bf16) into `fmt` rows of dst, in parallel.
void quantize_rows(ThreadPool& pool, const void* x, bool bf16, int T, int n, Act fmt, uint8_t* dst) {
    const size_t rb = act_row_bytes(fmt, n);
    const QuantizeFn q = quantizer(fmt);
    constexpr int TOK_CHUNK = 16;
    const int n_tasks = (T + TOK_CHUNK - 1) / TOK_CHUNK;
    pool.parallel_for(n_tasks, [&](int task, int) {
        thread_local std::vector<float> row;
        const int t1 = std::min(T, (task + 1) * TOK_CHUNK);
        for (int t = task * TOK_CHUNK; t < t1; ++t) {
            const float* src;
            if (bf16) {
                row.resize((size_t)n);
                const uint16_t* xs = static_cast<const uint16_t*>(x) + (size_t)t * n;
                for (int k = 0; k < n; ++k) row[k] = bf16_to_float(xs[k]);
                src = row.data();
            } else {
                src = static_cast<const float*>(x) + (size_t)t * n;
            }
            q(src, n, dst + (size_t)t * rb);
        }
    });
}

// Row chunk per task: at least `min_rows`, and about `per_thread` tasks per thread so dynamic
// scheduling evens out uneven work; capped so a chunk of weights stays in L2.
int row_chunk(int total_rows, int threads, int per_thread, int min_rows, int max_rows) {
    int c = (total_rows + threads * per_thread - 1) / (threads * per_thread);
    return std::max(min_rows, std::min(max_rows, c));
}

// ---------------------------------------------------------------------------------- GEMM ---

struct GemmArgs {
    const uint8_t* w;
    int qtype, rows, cols;
    const void* x;
    bool bf16;
    int T;
    float* out;  // (T, rows)
};

void run_gemm(const GemmArgs& a, const TierOps* ops) {
    check_matrix("gemm weight", a.qtype, a.cols);
    if (a.T == 0 || a.rows == 0) return;
    Context& c = ctx();
    ThreadPool& pool = c.pool();
    const int slot = type_slot(a.qtype);
    const Act fmt = ops->act[slot];
    const size_t xrb = act_row_bytes(fmt, a.cols);
    c.xq[0].resize((size_t)a.T * xrb);
    quantize_rows(pool, a.x, a.bf16, a.T, a.cols, fmt, c.xq[0].data());
    c.ptrs.resize((size_t)a.T);
    for (int t = 0; t < a.T; ++t) c.ptrs[t] = c.xq[0].data() + (size_t)t * xrb;
    const size_t wrb = row_bytes(a.qtype, a.cols);
    // 16 tasks per thread: a 1-token GEMV of 1408 rows is ~80 us on one core, so the last
    // task (the imbalance at the join) stays a few percent of it; 16..256 rows (256 rows of
    // Q4_K x 4096 = 576 KiB, within L2). (On the shared 2-core test machine 4 and 16 tasks per
    // thread measured the same within its noise, 1.5-1.6x on 2 threads.)
    const int ch = row_chunk(a.rows, pool.size(), 16, 16, 256);
    const int n_tasks = (a.rows + ch - 1) / ch;
    const RowsFn fn = ops->rows[slot];
    const void* const* ptrs = c.ptrs.data();
    pool.parallel_for(n_tasks, [&](int task, int) {
        const int r0 = task * ch, r1 = std::min(a.rows, r0 + ch);
        fn(a.w, wrb, a.cols, r0, r1, ptrs, a.T, a.out + r0, (size_t)a.rows);
    });
}

// ------------------------------------------------------------------------------ MoE FFN ---

// The expert descriptor table built by hybrimoe/cpu.py is an array of JobExpert (job.h).

struct Expert {
    const uint8_t* w[3];  // gate, up, down
    int type[3];
    int inter;
    const void* tok;
    int n_tok;
    bool tok64;
    const float* wts;
    int token(int i) const {
        return tok64 ? (int)static_cast<const int64_t*>(tok)[i] : static_cast<const int32_t*>(tok)[i];
    }
};

struct MoeArgs {
    const void* x;
    bool bf16;
    int T, H;
    float* out;  // (T, H), accumulated into
    std::vector<Expert> ex;
};

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

void run_moe(const MoeArgs& a, const TierOps* ops) {
    // Token ids are checked here, inside the job: an async job reports a bad id at wait().
    for (size_t e = 0; e < a.ex.size(); ++e) {
        const Expert& x = a.ex[e];
        for (int i = 0; i < x.n_tok; ++i) {
            const int64_t t = x.tok64 ? static_cast<const int64_t*>(x.tok)[i] : static_cast<const int32_t*>(x.tok)[i];
            if (t < 0 || t >= a.T)
                throw std::invalid_argument("moe_ffn: token_ids[" + std::to_string(e) + "][" + std::to_string(i) +
                                            "] = " + std::to_string(t) + " is out of range [0, " +
                                            std::to_string(a.T) + ")");
        }
    }
    Context& c = ctx();
    ThreadPool& pool = c.pool();
    const int E = (int)a.ex.size();
    const int H = a.H;

    // 1. x -> every activation format a gate/up matrix of this layer wants.
    bool need[N_ACTS] = {};
    for (const Expert& x : a.ex)
        if (x.n_tok > 0) need[(int)ops->act[type_slot(x.type[0])]] = need[(int)ops->act[type_slot(x.type[1])]] = true;
    for (int f = 0; f < N_ACTS; ++f) {
        if (!need[f]) continue;
        c.xq[f].resize((size_t)a.T * act_row_bytes((Act)f, H));
        quantize_rows(pool, a.x, a.bf16, a.T, H, (Act)f, c.xq[f].data());
    }

    // Offsets of each expert's rows in the shared scratch: hq (n_tok rows of the quantized
    // h = silu(gate) * up), and pointer lists [gate acts | up acts | down acts] per expert.
    std::vector<size_t> hq_off(E + 1, 0), p_off(E + 1, 0);
    for (int e = 0; e < E; ++e) {
        const Expert& x = a.ex[e];
        hq_off[e + 1] = hq_off[e] + (size_t)x.n_tok * act_row_bytes(ops->act[type_slot(x.type[2])], x.inter);
        p_off[e + 1] = p_off[e] + 3 * (size_t)x.n_tok;
    }
    c.hq.resize(hq_off[E]);
    c.ptrs.resize(p_off[E]);
    for (int e = 0; e < E; ++e) {
        const Expert& x = a.ex[e];
        const void** p = c.ptrs.data() + p_off[e];
        const Act fg = ops->act[type_slot(x.type[0])], fu = ops->act[type_slot(x.type[1])];
        const Act fd = ops->act[type_slot(x.type[2])];
        const size_t rg = act_row_bytes(fg, H), ru = act_row_bytes(fu, H), rd = act_row_bytes(fd, x.inter);
        for (int i = 0; i < x.n_tok; ++i) {
            const int t = x.token(i);
            p[i] = c.xq[(int)fg].data() + (size_t)t * rg;
            p[x.n_tok + i] = c.xq[(int)fu].data() + (size_t)t * ru;
            p[2 * x.n_tok + i] = c.hq.data() + hq_off[e] + (size_t)i * rd;
        }
    }

    // 2. gate and up over (expert, row chunk) tasks, biggest experts first: h = silu(g) * u in
    //    thread-local buffers, quantized at once into the down matrix's activation format. Each
    //    chunk is a whole number of that format's blocks (32 or 256 columns of h), so a task
    //    owns its blocks and no separate quantization pass (and barrier) is needed.
    int total_rows = 0;
    for (const Expert& x : a.ex)
        if (x.n_tok > 0) total_rows += x.inter;
    if (total_rows == 0) return;
    const int ch1 = row_chunk(total_rows, pool.size(), 8, 16, 128);
    struct Task { int e, r0, r1; };
    std::vector<Task> tasks;
    std::vector<int> order;
    for (int e = 0; e < E; ++e)
        if (a.ex[e].n_tok > 0) order.push_back(e);
    std::stable_sort(order.begin(), order.end(), [&](int p, int q) { return a.ex[p].n_tok > a.ex[q].n_tok; });
    for (int e : order) {
        const Act fd = ops->act[type_slot(a.ex[e].type[2])];
        const int blk = (fd == Act::Q8K || fd == Act::Q8K_Q4) ? QK_K : fd == Act::Q8_0 ? QK8_0 : 1;
        const int ch = (ch1 + blk - 1) / blk * blk;
        for (int r0 = 0; r0 < a.ex[e].inter; r0 += ch) tasks.push_back({e, r0, std::min(a.ex[e].inter, r0 + ch)});
    }
    pool.parallel_for((int)tasks.size(), [&](int k, int) {
        const Task& tk = tasks[k];
        const Expert& x = a.ex[tk.e];
        const int n = x.n_tok, nr = tk.r1 - tk.r0;
        thread_local std::vector<float> g, u;
        g.resize((size_t)n * nr);
        u.resize((size_t)n * nr);
        const void* const* p = c.ptrs.data() + p_off[tk.e];
        ops->rows[type_slot(x.type[0])](x.w[0], row_bytes(x.type[0], H), H, tk.r0, tk.r1, p, n, g.data(), nr);
        ops->rows[type_slot(x.type[1])](x.w[1], row_bytes(x.type[1], H), H, tk.r0, tk.r1, p + n, n, u.data(), nr);
        const Act fd = ops->act[type_slot(x.type[2])];
        const size_t rd = act_row_bytes(fd, x.inter), off = act_row_bytes(fd, tk.r0);
        const QuantizeFn q = quantizer(fd);
        for (int i = 0; i < n; ++i) {
            float* h = g.data() + (size_t)i * nr;  // h overwrites g in place
            const float* ui = u.data() + (size_t)i * nr;
            for (int j = 0; j < nr; ++j) h[j] = silu(h[j]) * ui[j];
            q(h, nr, c.hq.data() + hq_off[tk.e] + (size_t)i * rd + off);
        }
    });

    // 3. down over output-row chunks; each task adds every expert's rows in expert order, so the
    //    sum is the same whatever thread runs it (deterministic), and one big expert or many
    //    small ones give equal tasks.
    const int ch2 = row_chunk(H, pool.size(), 8, 16, 128);
    const int n2 = (H + ch2 - 1) / ch2;
    pool.parallel_for(n2, [&](int k, int) {
        const int r0 = k * ch2, r1 = std::min(H, r0 + ch2), nr = r1 - r0;
        thread_local std::vector<float> y;
        for (int e = 0; e < E; ++e) {
            const Expert& x = a.ex[e];
            if (x.n_tok == 0) continue;
            y.resize((size_t)x.n_tok * nr);
            const void* const* p = c.ptrs.data() + p_off[e] + 2 * (size_t)x.n_tok;
            ops->rows[type_slot(x.type[2])](x.w[2], row_bytes(x.type[2], x.inter), x.inter, r0, r1, p, x.n_tok, y.data(), nr);
            for (int i = 0; i < x.n_tok; ++i) {
                float* o = a.out + (size_t)x.token(i) * H + r0;
                const float wt = x.wts[i];
                const float* yi = y.data() + (size_t)i * nr;
                for (int j = 0; j < nr; ++j) o[j] += wt * yi[j];
            }
        }
    });
}

// --------------------------------------------------------------------- Python arguments ---

template <class T>
T* ptr_of(uint64_t p) { return reinterpret_cast<T*>((uintptr_t)p); }

MoeArgs make_moe_args(uint64_t x, bool bf16, int T, int H, uint64_t out, const py::array& desc) {
    if (desc.ndim() != 1 || desc.itemsize() != (py::ssize_t)sizeof(JobExpert) || !(desc.flags() & py::array::c_style))
        throw std::invalid_argument("moe_ffn: expert table must be a contiguous 1-D array of JobExpert (" +
                                    std::to_string(sizeof(JobExpert)) + "-byte records, hybrimoe.cpu.JOB_EXPERT_DTYPE)");
    if (T < 0 || H <= 0) throw std::invalid_argument("moe_ffn: bad x shape");
    MoeArgs a{ptr_of<const void>(x), bf16, T, H, ptr_of<float>(out), {}};
    const JobExpert* rows = static_cast<const JobExpert*>(desc.data());
    for (py::ssize_t e = 0; e < desc.shape(0); ++e) {
        const JobExpert& d = rows[e];
        Expert x;
        const char* names[3] = {"gate", "up", "down"};
        const int64_t w[3] = {d.gate, d.up, d.down}, ty[3] = {d.gate_type, d.up_type, d.down_type};
        for (int m = 0; m < 3; ++m) {
            x.w[m] = ptr_of<const uint8_t>((uint64_t)w[m]);
            x.type[m] = (int)ty[m];
        }
        x.inter = (int)d.inter;
        x.tok = ptr_of<const void>((uint64_t)d.tok);
        x.n_tok = (int)d.n_tok;
        x.tok64 = d.tok64 != 0;
        x.wts = ptr_of<const float>((uint64_t)d.wts);
        const std::string pre = "moe_ffn: expert " + std::to_string(e) + " ";
        check_matrix((pre + names[0]).c_str(), x.type[0], H);
        check_matrix((pre + names[1]).c_str(), x.type[1], H);
        check_matrix((pre + names[2]).c_str(), x.type[2], x.inter);
        if (x.n_tok < 0) throw std::invalid_argument(pre + "has a negative token count");
        a.ex.push_back(x);
    }
    return a;
}

// Move-only. It must be: a copyable Handle is returned to Python by copy, and the temporary's
// destructor then waited for the whole job with the GIL held, making every "submit" synchronous
// (the bug test_submit_returns_before_the_job_ends catches).
class Handle {
   public:
    Handle(std::shared_ptr<AsyncState> st, py::object keep) : st_(std::move(st)), keep_(std::move(keep)) {}
    Handle(Handle&&) noexcept = default;
    Handle& operator=(Handle&&) = delete;
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() {
        if (!st_) return;  // moved from
        // The job reads buffers that keep_ holds alive: never let them go before it finishes.
        // (The job needs no GIL; other Python threads may run while this waits.)
        bool done;
        {
            std::lock_guard<std::mutex> lk(st_->m);
            done = st_->done;
        }
        if (!done) {
            py::gil_scoped_release nogil;
            std::unique_lock<std::mutex> lk(st_->m);
            st_->cv.wait(lk, [&] { return st_->done; });
        }
    }
    bool done() {
        std::lock_guard<std::mutex> lk(st_->m);
        return st_->done;
    }
    py::object wait() {
        {
            py::gil_scoped_release nogil;
            std::unique_lock<std::mutex> lk(st_->m);
            st_->cv.wait(lk, [&] { return st_->done; });
        }
        if (st_->err) std::rethrow_exception(st_->err);
        return keep_;
    }

   private:
    std::shared_ptr<AsyncState> st_;
    py::object keep_;
};

}  // namespace
}  // namespace cpu
}  // namespace hybrimoe

using namespace hybrimoe::cpu;
using hybrimoe::QType;

void register_engine(py::module_& m);  // engine.cpp: the native per-layer decision engine

PYBIND11_MODULE(_cpu, m) {
    register_engine(m);
    m.doc() = "hybrimoe CPU kernels on raw GGUF blocks (use hybrimoe.cpu, which validates inputs)";
    m.def("tier", &current_tier, "Active tier: 'ref', 'generic' or 'avx512'.");
    m.def("available_tiers", &available_tiers, "Tiers this CPU can run, slowest first.");
    m.def("set_tier", &set_tier, py::arg("name"), "Force a tier; ValueError if this CPU cannot run it.");
    m.def("set_num_threads", &set_num_threads, py::arg("n"));
    m.def("num_threads", &num_threads);
    m.def("_set_spin_us", [](int64_t us) {
              py::gil_scoped_release nogil;
              std::lock_guard<std::mutex> lk(ctx().run_mu_);
              ctx().pool().set_spin_us(us);
          },
          py::arg("us"), "How long idle pool workers spin before sleeping (measurement; HYBRIMOE_SPIN_US sets it at start).");
    m.def("_spin_us", [] {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lk(ctx().run_mu_);
        return ctx().pool().spin_us();
    });
    m.def("physical_cores", &physical_cores);
    m.def("cpu_features", [] {
        py::dict d;
        d["avx2"] = features().avx2;
        d["avx512"] = features().avx512;
        d["avx512_vnni"] = features().vnni;
        return d;
    });
    m.def("_set_generic_scalar", [](bool on) { g_generic_scalar = on; },
          "Testing aid: run the generic tier's portable scalar code even where AVX2 exists.");
    m.def("_set_avx512_no_vnni", [](bool on) { g_avx512_no_vnni = on; },
          "Testing aid: run the avx512 tier's non-VNNI code (maddubs + madd) even where VNNI exists.");

    m.def(
        "gemm",
        [](uint64_t w, int qtype, int rows, int cols, uint64_t x, bool bf16, int T, uint64_t out) {
            const TierOps* ops = current_ops();
            GemmArgs a{ptr_of<const uint8_t>(w), qtype, rows, cols, ptr_of<const void>(x), bf16, T, ptr_of<float>(out)};
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lk(ctx().run_mu_);
            run_gemm(a, ops);
        },
        py::arg("w"), py::arg("qtype"), py::arg("rows"), py::arg("cols"), py::arg("x"), py::arg("bf16"), py::arg("T"),
        py::arg("out"), "out (T, rows) f32 = x (T, cols) @ W.T; raw pointers, validated by hybrimoe.cpu.gemm.");

    m.def(
        "moe_ffn",
        [](uint64_t x, bool bf16, int T, int H, uint64_t out, const py::array& desc) {
            const TierOps* ops = current_ops();
            MoeArgs a = make_moe_args(x, bf16, T, H, out, desc);
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lk(ctx().run_mu_);
            run_moe(a, ops);
        },
        py::arg("x"), py::arg("bf16"), py::arg("T"), py::arg("H"), py::arg("out"), py::arg("desc"));

    m.def(
        "moe_ffn_submit",
        [](uint64_t x, bool bf16, int T, int H, uint64_t out, const py::array& desc,
           py::object keep) {
            const TierOps* ops = current_ops();
            auto args = std::make_shared<MoeArgs>(make_moe_args(x, bf16, T, H, out, desc));
            auto st = std::make_shared<AsyncState>();
            ctx().submit(
                [args, ops] {
                    std::lock_guard<std::mutex> lk(ctx().run_mu_);
                    run_moe(*args, ops);
                },
                st);
            return Handle(st, std::move(keep));
        },
        py::arg("x"), py::arg("bf16"), py::arg("T"), py::arg("H"), py::arg("out"), py::arg("desc"), py::arg("keep"),
        "Queue moe_ffn on the pool's driver thread; returns a Handle at once. `keep` is returned by wait().");

    m.def(
        "attend_one",
        [](uint64_t q, int64_t qb, int64_t qh, uint64_t k, int64_t kb, int64_t kh, int64_t ks, uint64_t v, int64_t vb,
           int64_t vh, int64_t vs, uint64_t mask, int64_t mb, int64_t mh, int B, int H, int Hkv, int S, int dk, int dv,
           float scale, uint64_t out) {
            // Shapes, strides and dtypes are checked by hybrimoe.cpu.attend_one; here only what would
            // index out of the arrays if that check were skipped.
            if (B < 1 || H < 1 || Hkv < 1 || H % Hkv || S < 1 || dk < 1 || dv < 1)
                throw std::invalid_argument("attend_one: bad sizes B=" + std::to_string(B) + " H=" + std::to_string(H) +
                                            " Hkv=" + std::to_string(Hkv) + " S=" + std::to_string(S));
            AttendArgs a{ptr_of<const float>(q), qb, qh, ptr_of<const float>(k), kb, kh, ks, ptr_of<const float>(v),
                         vb, vh, vs, ptr_of<const float>(mask), mb, mh, B, H, Hkv, S, dk, dv, scale, ptr_of<float>(out),
                         false};
            // the AVX2 inner loops wherever the generic or avx512 tier runs them (not under ref, nor
            // under the generic tier's portable-code testing aid)
            a.avx2 = features().avx2 && !g_generic_scalar && current_tier() != "ref";
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lk(ctx().run_mu_);
            attend_one(ctx().pool(), a);
        },
        "One-token attention over strided float32 K/V (see kernels/cpu/attention.h); use hybrimoe.cpu.attend_one.");

    m.def(
        "rms_norm",
        [](uint64_t x, uint64_t w, int R, int n, float eps, uint64_t y) {
            if (R < 0 || n < 1) throw std::invalid_argument("rms_norm: bad sizes R=" + std::to_string(R) + " n=" + std::to_string(n));
            rms_norm_rows(ptr_of<const float>(x), ptr_of<const float>(w), R, n, eps, ptr_of<float>(y));
        },
        "RMSNorm of R contiguous float32 rows of n (see kernels/cpu/attention.h); use hybrimoe.cpu.rms_norm.");

    m.def(
        "mla_rope_norm",
        [](uint64_t q, int H, int dq, int rope, uint64_t ckv, int lora, uint64_t w, float eps, uint64_t freqs) {
            if (H < 1 || rope < 2 || rope % 2 || dq < rope || lora < 1)
                throw std::invalid_argument("mla_rope_norm: bad sizes H=" + std::to_string(H) + " dq=" + std::to_string(dq) +
                                            " rope=" + std::to_string(rope) + " lora=" + std::to_string(lora));
            mla_rope_norm(ptr_of<float>(q), H, dq, rope, ptr_of<float>(ckv), lora, ptr_of<const float>(w), eps,
                          ptr_of<const float>(freqs));
        },
        "DeepSeek-V2 one-token rope + latent RMSNorm in place (see kernels/cpu/attention.h); use hybrimoe.mla_decode.");

    m.def(
        "same_bytes",
        [](uint64_t a, uint64_t b, uint64_t n) {
            py::gil_scoped_release nogil;
            return std::memcmp(ptr_of<const void>(a), ptr_of<const void>(b), (size_t)n) == 0;
        },
        "memcmp(a, b, n) == 0 (the MLA memo's prefix check).");

    m.def(
        "job_expert_layout",
        [] {
            py::dict d;
#define HM_FIELD(f) d[#f] = offsetof(JobExpert, f)
            HM_FIELD(gate); HM_FIELD(gate_type); HM_FIELD(up); HM_FIELD(up_type); HM_FIELD(down);
            HM_FIELD(down_type); HM_FIELD(inter); HM_FIELD(tok); HM_FIELD(n_tok); HM_FIELD(tok64); HM_FIELD(wts);
#undef HM_FIELD
            return py::make_tuple(sizeof(JobExpert), d);
        },
        "(sizeof(JobExpert), {field: byte offset}): the C++ side of hybrimoe.cpu.JOB_EXPERT_DTYPE.");

    py::class_<Handle>(m, "Handle")
        .def("wait", &Handle::wait, "Block (GIL released) until done; re-raise the job's error; return `keep`.")
        .def("done", &Handle::done);

    m.def(
        "_memcpy",
        [](uint64_t dst, uint64_t src, uint64_t nbytes) {
            // The bandwidth yardstick of microbench/cpu_kernels.py: a plain copy split over the
            // same pool and threads as the kernels (chunks of 256 KiB).
            constexpr size_t CH = 256 << 10;
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lk(ctx().run_mu_);
            const int n = (int)((nbytes + CH - 1) / CH);
            ctx().pool().parallel_for(n, [&](int k, int) {
                const size_t o = (size_t)k * CH, len = std::min<size_t>(CH, nbytes - o);
                std::memcpy(ptr_of<uint8_t>(dst) + o, ptr_of<const uint8_t>(src) + o, len);
            });
        },
        "Measurement only: memcpy on the kernel thread pool.");

    m.def(
        "_read_sum",
        [](uint64_t src, uint64_t nbytes) {
            // The read ceiling of microbench/cpu_kernels.py: every byte read once (a sum), split over
            // the same pool and threads as the kernels, in the same 256 KiB chunks as _memcpy.
            constexpr size_t CH = 256 << 10;
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lk(ctx().run_mu_);
            const int n = (int)((nbytes + CH - 1) / CH);
            std::vector<uint64_t> part((size_t)n);
#if defined(__x86_64__) || defined(_M_X64)
            const bool avx2 = features().avx2 && !g_generic_scalar;  // the testing aid picks the portable sum
#else
            const bool avx2 = false;
#endif
            ctx().pool().parallel_for(n, [&](int k, int) {
                const size_t o = (size_t)k * CH, len = std::min<size_t>(CH, nbytes - o);
                const uint8_t* p = ptr_of<const uint8_t>(src) + o;
#if defined(__x86_64__) || defined(_M_X64)
                part[k] = avx2 ? read_sum_avx2(p, len) : read_sum_portable(p, len);
#else
                part[k] = read_sum_portable(p, len);
#endif
            });
            uint64_t s = 0;
            for (uint64_t v : part) s += v;
            return s;
        },
        "Measurement only: a streaming read on the kernel thread pool; returns the sum of the buffer as 64-bit\n"
        "words mod 2^64 (for a length that is a multiple of 128).");

#if defined(__x86_64__) || defined(_M_X64)
    m.def(
        "_gemm_q4k_f32act",
        [](uint64_t w, int rows, int cols, uint64_t x, int T, uint64_t out) {
            // Checks the active tier, not only the CPU: a caller that forgets to check then fails on every
            // machine once the tier is forced to generic (as tests/test_microbench.py does).
            if (current_tier() != "avx512")
                throw std::runtime_error(std::string("_gemm_q4k_f32act needs the avx512 tier (active: ") +
                                         current_tier() + ")");
            check_matrix("weight", (int)QType::Q4_K, cols);
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lk(ctx().run_mu_);
            ThreadPool& pool = ctx().pool();
            std::vector<const void*> p((size_t)T);
            for (int t = 0; t < T; ++t) p[t] = ptr_of<const float>(x) + (size_t)t * cols;
            const int ch = row_chunk(rows, pool.size(), 4, 16, 256);
            const size_t rb = row_bytes((int)QType::Q4_K, cols);
            pool.parallel_for((rows + ch - 1) / ch, [&](int k, int) {
                const int r0 = k * ch, r1 = std::min(rows, r0 + ch);
                q4k_rows_f32act_avx512(ptr_of<const uint8_t>(w), rb, cols, r0, r1, p.data(), T,
                                       ptr_of<float>(out) + r0, (size_t)rows);
            });
        },
        "Measurement only: Q4_K GEMM with float activations (no activation quantization), AVX-512.");
#endif
}
