#include "pool.h"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <set>
#include <string>
#include <utility>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HM_PAUSE() _mm_pause()
#else
#define HM_PAUSE() std::this_thread::yield()
#endif

namespace hybrimoe {
namespace cpu {

// Workers spin this long for the next job before sleeping on the condition variable. Between two
// kernel calls of a decode step the calling thread runs the model's torch work (norms, rope,
// attention: 0.1-1.5 ms a layer); a worker that fell asleep meanwhile costs the next call a futex
// wake-up, 50-60 us in a KVM guest (measured, 2-core Zen 3: a 0.66 MB Q4_K GEMV at 2 threads took
// 35 us back to back, 43 us after a 0.2 ms gap and 90 us after a 1 ms gap with the old ~0.1-0.3 ms
// spin). HYBRIMOE_SPIN_US overrides it (0: sleep at once, for a machine shared with other work).
constexpr int64_t DEFAULT_SPIN_US = 3000;
// Callers spin this many pause-iterations on the join before yielding.
constexpr int JOIN_SPIN_ITERS = 20000;

static int64_t spin_us_from_env() {
    const char* e = std::getenv("HYBRIMOE_SPIN_US");
    if (!e || !*e) return DEFAULT_SPIN_US;
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (end == e || *end || v < 0) return DEFAULT_SPIN_US;  // malformed: the default, never a crash
    return v > 1000000 ? 1000000 : (int64_t)v;
}

ThreadPool::ThreadPool(int n_threads) : n_(n_threads < 1 ? 1 : n_threads), spin_us_(spin_us_from_env()) {
    for (int i = 1; i < n_; ++i) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
        generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
}

void ThreadPool::run_tasks(Job& j, int id) {
    for (;;) {
        const int i = j.next.fetch_add(1, std::memory_order_relaxed);
        if (i >= j.n) break;
        if (!j.failed.load(std::memory_order_relaxed)) {
            try {
                (*j.fn)(i, id);
            } catch (...) {
                std::lock_guard<std::mutex> lk(j.err_mu);
                if (!j.err) j.err = std::current_exception();
                j.failed.store(true, std::memory_order_relaxed);  // the remaining tasks are skipped
            }
        }
        j.done.fetch_add(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::worker(int id) {
    uint64_t seen = 0;
    for (;;) {
        uint64_t g = generation_.load(std::memory_order_acquire);
        const int64_t spin = spin_us();
        if (g == seen && spin > 0) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin);
            for (int s = 1; g == seen; ++s) {
                HM_PAUSE();
                g = generation_.load(std::memory_order_acquire);
                if ((s & 255) == 0 && std::chrono::steady_clock::now() >= until) break;
            }
        }
        std::shared_ptr<Job> j;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            seen = generation_.load(std::memory_order_acquire);
            if (stop_) return;
            j = job_;
        }
        if (j) run_tasks(*j, id);
    }
}

void ThreadPool::parallel_for(int n_tasks, const std::function<void(int, int)>& fn) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> call(call_mu_);
    auto j = std::make_shared<Job>();
    j->fn = &fn;
    j->n = n_tasks;
    if (n_ > 1 && n_tasks > 1) {
        {
            std::lock_guard<std::mutex> lk(mu_);
            job_ = j;
            generation_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
    }
    run_tasks(*j, 0);
    for (int s = 0; j->done.load(std::memory_order_acquire) != n_tasks; ++s) {
        if (s < JOIN_SPIN_ITERS) HM_PAUSE();
        else std::this_thread::yield();
    }
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (job_ == j) job_.reset();
    }
    if (j->err) std::rethrow_exception(j->err);
}

int physical_cores() {
    int n = (int)std::thread::hardware_concurrency();
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        std::set<std::pair<std::string, std::string>> cores;  // (package, core id)
        int cpus = 0;
        bool topo_ok = true;
        for (int c = 0; c < CPU_SETSIZE; ++c) {
            if (!CPU_ISSET(c, &set)) continue;
            ++cpus;
            const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
            std::ifstream fp(base + "physical_package_id"), fc(base + "core_id");
            std::string p, k;
            if (!(fp >> p) || !(fc >> k)) {
                topo_ok = false;
                break;
            }
            cores.insert({p, k});
        }
        n = topo_ok && !cores.empty() ? (int)cores.size() : cpus;
    }
#endif
    return n < 1 ? 1 : n;
}

}  // namespace cpu
}  // namespace hybrimoe
