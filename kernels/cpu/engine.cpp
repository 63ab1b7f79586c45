// Native per-layer decision engine (see engine.h). Mirrors hybrimoe/cache.py, hybrimoe/step.py's
// decide() and hybrimoe/scheduler.py's plan() operation by operation, ties included (victims are
// scanned in the order experts became resident, as the Python dict is; the first minimum wins),
// so that both give the same decisions; tests/test_engine.py checks it.
#include "engine.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <functional>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

enum Policy { MRS = 0, LRU, LFU, STATIC, BYPASS };
enum Mode { HYBRID = 0, KT_STATIC, GPU_ONLY, CPU_ONLY, SEED };

struct LayerCosts {
    std::vector<double> cpu, gpu;  // cpu_time(n), gpu_time(n) for n = 0..size-1
    double transfer = 0, cpu_ovh = 0, gpu_ovh = 0;
};

class Engine {
   public:
    Engine(int n_layers, int n_experts, int policy, bool shared, std::vector<int> capacity, double alpha, int top_p,
           bool guard_prefetch, double window = 16.0, bool gate_demand = false)
        : L_(n_layers), E_(n_experts), policy_(policy), shared_(shared), alpha_(alpha), top_p_(top_p),
          guard_prefetch_(guard_prefetch), window_(window), gate_demand_(gate_demand) {
        if (L_ <= 0 || E_ <= 0) throw std::invalid_argument("Engine: n_layers and n_experts must be > 0");
        if (policy < MRS || policy > BYPASS) throw std::invalid_argument("Engine: unknown policy code");
        if (!(window >= 1.0)) throw std::invalid_argument("Engine: window must be >= 1 step");
        const int n_pools = shared ? 1 : L_;
        if ((int)capacity.size() != n_pools) throw std::invalid_argument("Engine: one capacity per pool");
        const size_t K = (size_t)L_ * E_;
        slot_.assign(K, -1);
        last_.assign(K, 0);
        freq_.assign(K, 0);
        scores_.assign(K, 0.0);
        wfreq_.assign(K, 0.0);
        pinned_.assign(K, 0);
        prefetched_.assign(K, 0);
        guard_.assign(K, 0);
        used_by_layer_.assign(L_, 0);
        wasted_by_layer_.assign(L_, 0);
        order_.resize(n_pools);
        free_.resize(n_pools);
        capacity_ = capacity;
        for (int p = 0; p < n_pools; ++p)
            for (int s = capacity[p] - 1; s >= 0; --s) free_[p].push_back(s);
    }

    // ------------------------------------------------------------------ state from Python
    // Residents in the Python cache's order ((layer, expert, slot) rows), its free lists, ticks.
    void load_state(py::array_t<int64_t, py::array::c_style> res, std::vector<std::vector<int>> free_lists,
                    py::array_t<int64_t, py::array::c_style> last, int64_t tick, bool hot) {
        auto r = res.unchecked<2>();
        for (auto& o : order_) o.clear();
        std::fill(slot_.begin(), slot_.end(), -1);
        for (py::ssize_t i = 0; i < r.shape(0); ++i) {
            const int layer = (int)r(i, 0), e = (int)r(i, 1);
            check(layer, e);
            const int64_t k = key(layer, e);
            slot_[k] = (int)r(i, 2);
            order_[pool(layer)].push_back(k);
        }
        if (free_lists.size() != free_.size()) throw std::invalid_argument("Engine.load_state: one free list per pool");
        free_ = free_lists;
        if (last.size() != (py::ssize_t)last_.size()) throw std::invalid_argument("Engine.load_state: last (L*E)");
        std::memcpy(last_.data(), last.data(), last_.size() * sizeof(int64_t));
        tick_ = tick;
        hot_ = hot;
    }

    void set_costs(int layer_index, py::array_t<double> cpu, py::array_t<double> gpu, double transfer, double cpu_ovh,
                   double gpu_ovh) {
        if (layer_index < 0) throw std::invalid_argument("Engine.set_costs: layer index");
        if ((int)costs_.size() <= layer_index) costs_.resize(layer_index + 1);
        LayerCosts& c = costs_[layer_index];
        c.cpu.assign(cpu.data(), cpu.data() + cpu.size());
        c.gpu.assign(gpu.data(), gpu.data() + gpu.size());
        c.transfer = transfer;
        c.cpu_ovh = cpu_ovh;
        c.gpu_ovh = gpu_ovh;
    }

    void set_seed(double g_unit, double c_coef, double c_icpt, double move) { seed_ = {g_unit, c_coef, c_icpt, move}; }

    // ------------------------------------------------------------------ queries
    bool contains(int layer, int e) const { return in(layer, e) && slot_[key(layer, e)] >= 0; }
    int lookup(int layer, int e) const { return in(layer, e) ? slot_[key(layer, e)] : -1; }

    std::vector<std::pair<int, int>> resident(int layer) const {
        std::vector<std::pair<int, int>> out;
        for (int64_t k : order_[pool(layer)])
            if (k / E_ == layer) out.emplace_back((int)(k % E_), slot_[k]);
        return out;
    }

    bool can_admit(int layer, int e, const std::vector<int>& protect, bool prefetch) const {
        if (contains(layer, e)) return true;
        if (hot_) return false;
        const int p = pool(layer);
        if (!free_[p].empty()) return true;
        for (int64_t k : order_[p]) {
            if (pinned_[k] || (prefetch && guard_[k])) continue;
            if (k / E_ == layer && std::find(protect.begin(), protect.end(), (int)(k % E_)) != protect.end()) continue;
            return true;
        }
        return false;
    }

    // ------------------------------------------------------------------ updates (cache.py twins)
    void observe(int layer, const float* s, int T) {
        if (policy_ != MRS || T == 0) return;
        std::vector<double> top(E_, 0.0);
        if (top_p_ >= E_) {
            for (int t = 0; t < T; ++t)
                for (int e = 0; e < E_; ++e) top[e] += (double)s[(size_t)t * E_ + e];
            for (int e = 0; e < E_; ++e) top[e] /= T;
        } else {
            std::vector<int> idx(E_);
            for (int t = 0; t < T; ++t) {
                const float* row = s + (size_t)t * E_;
                for (int e = 0; e < E_; ++e) idx[e] = e;
                std::nth_element(idx.begin(), idx.begin() + (top_p_ - 1), idx.end(),
                                 [&](int a, int b) { return row[a] > row[b]; });
                for (int j = 0; j < top_p_; ++j) top[idx[j]] += (double)row[idx[j]];
            }
            if (T > 1)
                for (int e = 0; e < E_; ++e) top[e] /= T;
        }
        double* sc = scores_.data() + (size_t)layer * E_;
        for (int e = 0; e < E_; ++e) sc[e] = alpha_ * top[e] + (1.0 - alpha_) * sc[e];
    }

    int access(int layer, const int64_t* ex, int n) {
        ++tick_;
        if (policy_ == BYPASS) {  // windowed frequency F: decay per step of the layer, +1 per use
            const double d = 1.0 - 1.0 / window_;
            double* w = wfreq_.data() + (size_t)layer * E_;
            for (int e = 0; e < E_; ++e) w[e] *= d;
        }
        if (guard_n_) clear_guard(layer);
        int hits = 0;
        for (int i = 0; i < n; ++i) {
            const int64_t k = key(layer, (int)ex[i]);
            freq_[k] += 1;
            wfreq_[k] += 1.0;
            if (slot_[k] < 0) {
                ++misses_;
            } else {
                ++hits_;
                ++hits;
                last_[k] = tick_;
                if (prefetched_[k]) {
                    prefetched_[k] = 0;
                    --prefetched_n_;
                    ++prefetch_used_;
                    ++used_by_layer_[layer];
                }
            }
        }
        return hits;
    }

    // (slot or -1, evicted key or -1). fill: a copy in idle link time of an expert the layer ran
    // on the CPU (bypass: gated, counted in fills_); demand loads are gated when gate_demand_.
    std::pair<int, int64_t> admit(int layer, int e, bool prefetch, const int64_t* protect, int n_protect,
                                  bool fill = false) {
        check(layer, e);
        const int64_t k = key(layer, e);
        if (slot_[k] >= 0) return {slot_[k], -1};
        if (hot_) {
            ++bypass_;
            return {-1, -1};
        }
        const int p = pool(layer);
        int64_t evicted = -1;
        if (free_[p].empty()) {
            evicted = victim(p, layer, protect, n_protect, !prefetch);
            if (evicted < 0) {
                ++bypass_;
                return {-1, -1};
            }
            if (!prefetch && (fill || gate_demand_) && !admits(k, evicted)) {
                ++bypass_;
                ++declined_;
                return {-1, -1};
            }
            evict(p, evicted);
        }  // (a free slot: the gate admits; cache.py's _admits(key, None))
        ++tick_;
        if (fill) ++fills_;
        const int s = free_[p].back();
        free_[p].pop_back();
        slot_[k] = s;
        order_[p].push_back(k);
        last_[k] = tick_;
        if (prefetch) {
            if (!prefetched_[k]) ++prefetched_n_;
            prefetched_[k] = 1;
            if (guard_prefetch_ && !guard_[k]) {
                guard_[k] = 1;
                ++guard_n_;
            }
        }
        return {s, evicted};
    }

    // bypass's gate (cache.py _admits): a miss beats the victim on F; always for the others
    bool admits(int64_t k, int64_t victim_key) const {
        if (policy_ != BYPASS || victim_key < 0) return true;
        return wfreq_[k] > wfreq_[victim_key];
    }
    double reuse_score(int layer, int e) const {
        check(layer, e);
        return policy_ == BYPASS ? wfreq_[key(layer, e)] : 0.0;
    }
    // cache.py wants_fill: would a fill of this (non-resident) expert be admitted now?
    bool wants_fill(int layer, int e, const int64_t* protect, int n_protect) const {
        check(layer, e);
        if (policy_ != BYPASS || contains(layer, e)) return false;
        const int p = pool(layer);
        if (!free_[p].empty()) return true;
        const int64_t v = victim(p, layer, protect, n_protect, true);
        return v >= 0 && admits(key(layer, e), v);
    }

    void pin(int layer, const int64_t* ex, int n) {
        for (int i = 0; i < n; ++i) pinned_[key(layer, (int)ex[i])] = 1;
    }
    void unpin(int layer) { std::memset(pinned_.data() + (size_t)layer * E_, 0, E_); }
    void unpin_some(int layer, const std::vector<int>& ex) {
        for (int e : ex) pinned_[key(layer, e)] = 0;
    }

    // ------------------------------------------------------------------ one layer's decisions
    // observe -> access -> plan -> pin -> admit (hybrimoe/step.py decide). experts ascending,
    // counts >= 1; scores (T, E) float32 or T = 0; ready: (expert, seconds) pairs.
    void decide(int layer, int mode, const int64_t* ex, const int64_t* cnt, int n, const float* scores, int T,
                double pcie_busy, const int64_t* ready_e, const double* ready_t, int n_ready, int32_t* out,
                double* times) {
        if (layer < 0 || layer >= L_) throw std::invalid_argument("Engine.decide: layer out of range");
        for (int i = 0; i < n; ++i) check(layer, (int)ex[i]);
        const LayerCosts& lc = costs_for(layer, cnt, n);  // before any state changes: a caller may grow the tables and retry
        if (scores) observe(layer, scores, T);
        const int hits = access(layer, ex, n);
        // queue: resident by (count desc, id), then the rest by (count desc, id)
        std::vector<int> cached, rest;
        std::vector<int64_t> count_of(E_, 0);
        for (int i = 0; i < n; ++i) {
            count_of[ex[i]] = cnt[i];
            (slot_[key(layer, (int)ex[i])] >= 0 ? cached : rest).push_back((int)ex[i]);
        }
        auto by = [&](int a, int b) { return count_of[a] != count_of[b] ? count_of[a] > count_of[b] : a < b; };
        std::sort(cached.begin(), cached.end(), by);
        std::sort(rest.begin(), rest.end(), by);
        std::vector<int> queue(cached);
        queue.insert(queue.end(), rest.begin(), rest.end());
        std::vector<uint8_t> is_cached(E_, 0);
        for (int e : cached) is_cached[e] = 1;
        auto ready_of = [&](int e) {
            for (int j = 0; j < n_ready; ++j)
                if (ready_e[j] == e) return ready_t[j];
            return 0.0;
        };
        std::vector<int> gpu, loads, cpu;
        place(mode, lc, queue, is_cached, count_of, pcie_busy, ready_of, gpu, loads, cpu, seed_);
        lanes(lc, gpu, loads, cpu, count_of, pcie_busy, ready_of, times);
        pin(layer, ex, n);
        std::vector<int> gpu_slots, admitted, admitted_slots, refused;
        std::vector<int64_t> evicted;
        for (int e : gpu) gpu_slots.push_back(slot_[key(layer, e)]);
        for (int e : loads) {
            auto r = admit(layer, e, false, ex, n);
            if (r.first < 0) {
                refused.push_back(e);
                continue;
            }
            admitted.push_back(e);
            admitted_slots.push_back(r.first);
            if (r.second >= 0) evicted.push_back(r.second);
        }
        std::vector<int> cpu_final(cpu);
        cpu_final.insert(cpu_final.end(), refused.begin(), refused.end());
        if (refused.empty()) {
            for (int j = 0; j < 4; ++j) times[4 + j] = times[j];
        } else {
            lanes(lc, gpu, admitted, cpu_final, count_of, pcie_busy, ready_of, times + 4);
        }
        DecideHeader h{hits, (int32_t)gpu.size(), (int32_t)loads.size(), (int32_t)cpu.size(), (int32_t)admitted.size(),
                       (int32_t)refused.size(), (int32_t)evicted.size(), (int32_t)cpu_final.size()};
        std::memcpy(out, &h, sizeof h);
        int32_t* o = out + sizeof(DecideHeader) / sizeof(int32_t);
        auto put = [&](const std::vector<int>& v) {
            for (int x : v) *o++ = x;
        };
        put(gpu);
        put(gpu_slots);
        put(loads);
        put(cpu);
        put(admitted);
        put(admitted_slots);
        put(refused);
        for (int64_t k : evicted) {
            *o++ = (int32_t)(k / E_);
            *o++ = (int32_t)(k % E_);
        }
        put(cpu_final);
    }

    // The prefetcher's choice (hybrimoe/prefetch.py Prefetcher.choose) and its admission
    // (hybrimoe/step.py prefetch), in one call. Targets in order; per target t its predicted
    // experts exp[off[t]..off[t+1]) with token counts and probabilities, and the link's idle
    // seconds before it. Writes per admitted order (target layer, expert, slot, evicted layer,
    // evicted expert) into out_i (5 int64 each) and (gain, transfer seconds) into out_d; returns
    // how many orders the prefetcher chose (admitted or not: n_chosen) and how many were admitted.
    std::pair<int, int> prefetch(int layer, int n_t, const int64_t* tls, const int64_t* off, const int64_t* exp,
                                 const int64_t* cnt, const double* prob, const double* idle, int prefetch_size,
                                 int horizon, int mode, double min_gain, int64_t* out_i, double* out_d) {
        struct Cand {
            int tl, e;
            double pr;
            int64_t n;
        };
        std::vector<Cand> cands;
        std::vector<std::vector<int64_t>> hits(n_t), rest(n_t);
        std::vector<double> base(n_t, 0.0);
        std::vector<uint8_t> has_base(n_t, 0);
        auto idle_of = [&](int tl) {
            for (int t = 0; t < n_t; ++t)
                if (tls[t] == tl) return idle[t];
            return 0.0;
        };
        auto tidx = [&](int tl) {
            for (int t = 0; t < n_t; ++t)
                if (tls[t] == tl) return t;
            return -1;
        };
        for (int t = 0; t < n_t; ++t) {
            const int tl = (int)tls[t];
            if (tl - layer < 1 || tl - layer > horizon || idle[t] < transfer_of(tl)) continue;
            std::vector<Cand> lc;
            for (int64_t j = off[t]; j < off[t + 1]; ++j) {
                const int e = (int)exp[j];
                check(tl, e);
                if (contains(tl, e)) {
                    hits[t].push_back(cnt[j]);
                } else {
                    rest[t].push_back(cnt[j]);
                    if (prob[j] > 0) lc.push_back({tl, e, prob[j], cnt[j]});
                }
            }
            if (!lc.empty()) {
                std::vector<int> protect;
                for (int64_t j = off[t]; j < off[t + 1]; ++j) protect.push_back((int)exp[j]);
                if (can_admit(tl, lc[0].e, protect, true)) cands.insert(cands.end(), lc.begin(), lc.end());
            }
        }
        double used = 0.0;
        // (target index, count) -> seconds saved; cleared per target on a pick
        std::vector<std::vector<std::pair<int64_t, double>>> saved(n_t);
        int n_out = 0, n_chosen = 0;
        while (!cands.empty() && n_chosen < prefetch_size) {
            std::vector<Cand> keep;
            for (const Cand& c : cands)
                if (used + transfer_of(c.tl) <= idle_of(c.tl)) keep.push_back(c);
            cands.swap(keep);
            int best = -1;
            double best_g = 0.0;
            for (int i = 0; i < (int)cands.size(); ++i) {
                const Cand& c = cands[i];
                const int t = tidx(c.tl);
                double d = 0.0;
                bool found = false;
                for (auto& sv : saved[t])
                    if (sv.first == c.n) {
                        d = sv.second;
                        found = true;
                        break;
                    }
                if (!found) {
                    if (!has_base[t]) {
                        base[t] = makespan_of(c.tl, hits[t], rest[t], mode);
                        has_base[t] = 1;
                    }
                    std::vector<int64_t> r(rest[t]);
                    r.erase(std::find(r.begin(), r.end(), c.n));
                    std::vector<int64_t> h(hits[t]);
                    h.push_back(c.n);
                    d = base[t] - makespan_of(c.tl, h, r, mode);
                    saved[t].emplace_back(c.n, d);
                }
                const double g = c.pr * d;
                if (best < 0 || g > best_g) {
                    best = i;
                    best_g = g;
                }
            }
            if (best < 0 || best_g <= min_gain) break;
            const Cand c = cands[best];
            const int t = tidx(c.tl);
            const double tr = transfer_of(c.tl);
            cands.erase(cands.begin() + best);
            used += tr;
            hits[t].push_back(c.n);
            rest[t].erase(std::find(rest[t].begin(), rest[t].end(), c.n));
            has_base[t] = 0;
            saved[t].clear();
            ++n_chosen;
            // admission (step.prefetch): protect the target layer's predicted experts
            std::vector<int64_t> prot(exp + off[t], exp + off[t + 1]);
            auto r = admit(c.tl, c.e, true, prot.data(), (int)prot.size());
            if (r.first < 0) continue;
            int64_t* o = out_i + 5 * (size_t)n_out;
            o[0] = c.tl;
            o[1] = c.e;
            o[2] = r.first;
            o[3] = r.second >= 0 ? r.second / E_ : -1;
            o[4] = r.second >= 0 ? r.second % E_ : -1;
            out_d[2 * n_out] = best_g;
            out_d[2 * n_out + 1] = tr;
            ++n_out;
        }
        return {n_chosen, n_out};
    }

    void set_prefetch_seed(double g_unit, double c_coef, double c_icpt, double move) {
        pseed_ = {g_unit, c_coef, c_icpt, move};
    }

    py::dict stats() const {
        py::dict d;
        const int64_t n = hits_ + misses_;
        d["hits"] = hits_;
        d["misses"] = misses_;
        d["hit_rate"] = n ? (double)hits_ / (double)n : 0.0;
        d["evictions"] = evictions_;
        d["bypass"] = bypass_;
        d["prefetch_used"] = prefetch_used_;
        d["prefetch_wasted"] = prefetch_wasted_;
        d["prefetch_pending"] = prefetched_n_;
        d["declined"] = declined_;
        d["fills"] = fills_;
        return d;
    }
    std::vector<int64_t> used_by_layer() const { return used_by_layer_; }
    std::vector<int64_t> wasted_by_layer() const { return wasted_by_layer_; }
    py::array_t<double> scores() const {
        py::array_t<double> a({L_, E_});
        std::memcpy(a.mutable_data(), scores_.data(), scores_.size() * sizeof(double));
        return a;
    }
    py::array_t<double> wfreq() const {
        py::array_t<double> a({L_, E_});
        std::memcpy(a.mutable_data(), wfreq_.data(), wfreq_.size() * sizeof(double));
        return a;
    }
    py::array_t<int64_t> freq() const {
        py::array_t<int64_t> a({L_, E_});
        std::memcpy(a.mutable_data(), freq_.data(), freq_.size() * sizeof(int64_t));
        return a;
    }

   private:
    int L_, E_, policy_;
    bool shared_;
    double alpha_;
    int top_p_;
    bool guard_prefetch_;
    double window_;
    bool gate_demand_;
    bool hot_ = false;
    int64_t tick_ = 0;
    std::vector<int> slot_;
    std::vector<int64_t> last_, freq_;
    std::vector<double> scores_, wfreq_;
    std::vector<uint8_t> pinned_, prefetched_, guard_;
    int64_t guard_n_ = 0, prefetched_n_ = 0;
    std::vector<std::vector<int64_t>> order_;  // per pool: resident keys in the order they became resident
    std::vector<std::vector<int>> free_;
    std::vector<int> capacity_;
    std::vector<LayerCosts> costs_;
    struct Seed {
        double g_unit = 0.5, c_coef = 1.0, c_icpt = 0.79, move = 0.41791011235117914;
    };
    Seed seed_, pseed_;  // the plan's (seed_model) and the prefetcher's (scheduler.makespan's default)
    int64_t hits_ = 0, misses_ = 0, evictions_ = 0, bypass_ = 0, prefetch_used_ = 0, prefetch_wasted_ = 0;
    int64_t declined_ = 0, fills_ = 0;
    std::vector<int64_t> used_by_layer_, wasted_by_layer_;

    int64_t key(int layer, int e) const { return (int64_t)layer * E_ + e; }
    int pool(int layer) const { return shared_ ? 0 : layer; }
    bool in(int layer, int e) const { return layer >= 0 && layer < L_ && e >= 0 && e < E_; }
    void check(int layer, int e) const {
        if (!in(layer, e))
            throw std::invalid_argument("Engine: (layer " + std::to_string(layer) + ", expert " + std::to_string(e) +
                                        ") out of range (" + std::to_string(L_) + " layers, " + std::to_string(E_) +
                                        " experts)");
    }

    void clear_guard(int layer) {
        for (int e = 0; e < E_; ++e) {
            uint8_t& g = guard_[key(layer, e)];
            if (g) {
                g = 0;
                --guard_n_;
            }
        }
    }

    const LayerCosts& costs_for(int layer, const int64_t* cnt, int n) const {
        if (costs_.empty()) throw std::runtime_error("Engine: no cost model (set_costs)");
        const LayerCosts& lc = costs_[costs_.size() == 1 ? 0 : layer];
        for (int i = 0; i < n; ++i)
            if (cnt[i] < 1 || cnt[i] >= (int64_t)lc.cpu.size())
                throw std::out_of_range("Engine: token count " + std::to_string(cnt[i]) + " outside the cost tables (1.." +
                                        std::to_string(lc.cpu.size() - 1) + ")");
        return lc;
    }

    double transfer_of(int tl) const {
        if (costs_.empty()) throw std::runtime_error("Engine: no cost model (set_costs)");
        return costs_[costs_.size() == 1 ? 0 : tl].transfer;
    }

    // scheduler.makespan: the plan's makespan from token counts (resident ones, the others)
    double makespan_of(int tl, std::vector<int64_t> res, std::vector<int64_t> other, int mode) const {
        std::sort(res.begin(), res.end(), std::greater<int64_t>());
        std::sort(other.begin(), other.end(), std::greater<int64_t>());
        const int nh = (int)res.size(), n = nh + (int)other.size();
        std::vector<int64_t> count(res);
        count.insert(count.end(), other.begin(), other.end());
        std::vector<int> queue(n);
        std::vector<uint8_t> cached(n, 0);
        for (int i = 0; i < n; ++i) queue[i] = i;
        for (int i = 0; i < nh; ++i) cached[i] = 1;
        const LayerCosts& lc = costs_for(tl, count.data(), n);
        auto ready = [](int) { return 0.0; };
        std::vector<int> gpu, loads, cpu;
        place(mode, lc, queue, cached, count, 0.0, ready, gpu, loads, cpu, pseed_);
        double t[4];
        lanes(lc, gpu, loads, cpu, count, 0.0, ready, t);
        return t[3];
    }

    int64_t victim(int p, int layer, const int64_t* protect, int n_protect, bool demand) const {
        auto prot = [&](int64_t k) {
            if (k / E_ != layer) return false;
            for (int j = 0; j < n_protect; ++j)
                if (protect[j] == k % E_) return true;
            return false;
        };
        // candidates: not pinned, not protected; guarded prefetches only for a demand load when nothing else can go
        bool any_free = false, any = false;
        for (int64_t k : order_[p]) {
            if (pinned_[k] || prot(k)) continue;
            any = true;
            if (!guard_[k]) any_free = true;
        }
        if (!any) return -1;
        const bool skip_guard = guard_n_ && (any_free || !demand);
        if (guard_n_ && !any_free && !demand) return -1;
        int64_t best = -1;
        for (int64_t k : order_[p]) {
            if (pinned_[k] || prot(k) || (skip_guard && guard_[k])) continue;
            if (best < 0 || less(k, best)) best = k;
        }
        return best;
    }

    bool less(int64_t a, int64_t b) const {  // policy key of a strictly below b's
        if (policy_ == LRU) return last_[a] < last_[b];
        if (policy_ == LFU) return freq_[a] != freq_[b] ? freq_[a] < freq_[b] : last_[a] < last_[b];
        if (policy_ == BYPASS) return wfreq_[a] != wfreq_[b] ? wfreq_[a] < wfreq_[b] : last_[a] < last_[b];
        return scores_[a] != scores_[b] ? scores_[a] < scores_[b] : last_[a] < last_[b];
    }

    void evict(int p, int64_t k) {
        const int s = slot_[k];
        slot_[k] = -1;
        auto& o = order_[p];
        o.erase(std::find(o.begin(), o.end(), k));
        free_[p].push_back(s);
        ++evictions_;
        if (guard_[k]) {
            guard_[k] = 0;
            --guard_n_;
        }
        if (prefetched_[k]) {
            prefetched_[k] = 0;
            --prefetched_n_;
            ++prefetch_wasted_;
            ++wasted_by_layer_[k / E_];
        }
    }

    template <class Ready>
    void place(int mode, const LayerCosts& lc, const std::vector<int>& queue, const std::vector<uint8_t>& cached,
               const std::vector<int64_t>& count, double pcie_busy, Ready ready, std::vector<int>& gpu,
               std::vector<int>& loads, std::vector<int>& cpu, const Seed& seed) const {
        if (mode == KT_STATIC || mode == GPU_ONLY || mode == CPU_ONLY) {
            for (int e : queue) {
                if (mode == CPU_ONLY) cpu.push_back(e);
                else if (cached[e]) gpu.push_back(e);
                else (mode == GPU_ONLY ? loads : cpu).push_back(e);
            }
            return;
        }
        int lo = 0, hi = (int)queue.size() - 1;
        if (mode == SEED) {
            int64_t mx = 1;
            for (int e : queue) mx = std::max(mx, count[e]);
            if (mx > 1) {  // the released code: prefill never uses the CPU
                for (int e : queue) (cached[e] ? gpu : loads).push_back(e);
                return;
            }
            double g_tot = 0, c_tot = 0, m_tot = 0;
            while (lo <= hi) {
                const int f = queue[lo], b = queue[hi];
                const bool is_move = !cached[f];
                double g_time = seed.g_unit;
                const double c_time = seed.c_coef * (double)count[b] + (cpu.empty() ? seed.c_icpt : 0.0);
                if (is_move && m_tot + seed.move > g_tot) g_time += m_tot + seed.move - g_tot;
                if (g_tot + g_time <= c_tot + c_time) {
                    if (is_move) {
                        m_tot += seed.move;
                        loads.push_back(f);
                    } else {
                        gpu.push_back(f);
                    }
                    g_tot += g_time;
                    ++lo;
                } else {
                    c_tot += c_time;
                    cpu.push_back(b);
                    --hi;
                }
            }
            return;
        }
        // hybrid: the two-ended greedy on the cost model
        double t_gpu = 0, t_cpu = 0, t_pcie = pcie_busy;
        while (lo <= hi) {
            const int f = queue[lo], b = queue[hi];
            const double base = (!gpu.empty() || !loads.empty()) ? t_gpu : lc.gpu_ovh;
            double g_end;
            if (cached[f]) g_end = std::max(base, ready(f)) + lc.gpu[count[f]];
            else g_end = std::max(base, t_pcie + lc.transfer) + lc.gpu[count[f]];
            const double c_end = (!cpu.empty() ? t_cpu : lc.cpu_ovh) + lc.cpu[count[b]];
            if (g_end <= c_end) {
                if (cached[f]) {
                    gpu.push_back(f);
                } else {
                    loads.push_back(f);
                    t_pcie += lc.transfer;
                }
                t_gpu = g_end;
                ++lo;
            } else {
                cpu.push_back(b);
                t_cpu = c_end;
                --hi;
            }
        }
    }

    template <class Ready>
    void lanes(const LayerCosts& lc, const std::vector<int>& gpu, const std::vector<int>& loads,
               const std::vector<int>& cpu, const std::vector<int64_t>& count, double pcie_busy, Ready ready,
               double* t) const {
        double t_pcie = pcie_busy;
        std::vector<std::pair<int, double>> arrive;
        for (int e : loads) {
            t_pcie = t_pcie + lc.transfer;
            arrive.emplace_back(e, t_pcie);
        }
        double t_gpu = (!gpu.empty() || !loads.empty()) ? lc.gpu_ovh : 0.0;
        for (int e : gpu) t_gpu = std::max(t_gpu, ready(e)) + lc.gpu[count[e]];
        for (auto& a : arrive) t_gpu = std::max(t_gpu, a.second) + lc.gpu[count[a.first]];
        double t_cpu = !cpu.empty() ? lc.cpu_ovh : 0.0;
        for (int e : cpu) t_cpu = t_cpu + lc.cpu[count[e]];
        t[0] = t_cpu;
        t[1] = t_gpu;
        t[2] = std::max(t_pcie, pcie_busy);
        t[3] = std::max(t_cpu, t_gpu);
    }
};

template <class T>
const T* data_or_null(const py::object& o) {
    if (o.is_none()) return nullptr;
    return static_cast<const T*>(py::cast<py::array>(o).data());
}

}  // namespace

void register_engine(py::module_& m) {
    py::class_<Engine>(m, "Engine")
        .def(py::init<int, int, int, bool, std::vector<int>, double, int, bool, double, bool>(), py::arg("n_layers"),
             py::arg("n_experts"), py::arg("policy"), py::arg("shared"), py::arg("capacity"), py::arg("alpha"),
             py::arg("top_p"), py::arg("guard_prefetch"), py::arg("window") = 16.0, py::arg("gate_demand") = false)
        .def("load_state", &Engine::load_state)
        .def("set_costs", &Engine::set_costs)
        .def("set_seed", &Engine::set_seed)
        .def("contains", &Engine::contains)
        .def("lookup", &Engine::lookup)
        .def("resident", &Engine::resident)
        .def("can_admit", &Engine::can_admit)
        .def("observe",
             [](Engine& g, int layer, py::array_t<float, py::array::c_style | py::array::forcecast> s) {
                 g.observe(layer, s.data(), (int)s.shape(0));
             })
        .def("access",
             [](Engine& g, int layer, py::array_t<int64_t, py::array::c_style | py::array::forcecast> ex) {
                 return g.access(layer, ex.data(), (int)ex.size());
             })
        .def(
            "admit",
            [](Engine& g, int layer, int e, bool prefetch, py::array_t<int64_t, py::array::c_style | py::array::forcecast> p,
               bool fill) { return g.admit(layer, e, prefetch, p.data(), (int)p.size(), fill); },
            py::arg("layer"), py::arg("expert"), py::arg("prefetch"), py::arg("protect"), py::arg("fill") = false)
        .def("reuse_score", &Engine::reuse_score)
        .def("wants_fill",
             [](Engine& g, int layer, int e, py::array_t<int64_t, py::array::c_style | py::array::forcecast> p) {
                 return g.wants_fill(layer, e, p.data(), (int)p.size());
             })
        .def("wfreq", &Engine::wfreq)
        .def("pin",
             [](Engine& g, int layer, py::array_t<int64_t, py::array::c_style | py::array::forcecast> ex) {
                 g.pin(layer, ex.data(), (int)ex.size());
             })
        .def("unpin", &Engine::unpin)
        .def("unpin_some", &Engine::unpin_some)
        .def(
            "decide",
            [](Engine& g, int layer, int mode, py::array_t<int64_t, py::array::c_style> ex,
               py::array_t<int64_t, py::array::c_style> cnt, py::object scores, double pcie_busy, py::object ready_e,
               py::object ready_t, py::array_t<int32_t, py::array::c_style> out, py::array_t<double, py::array::c_style> times) {
                const int n = (int)ex.size();
                if (cnt.size() != n) throw std::invalid_argument("Engine.decide: counts must match experts");
                if (out.size() < 8 + 8 * (py::ssize_t)n + 8) throw std::invalid_argument("Engine.decide: out too small");
                if (times.size() < 8) throw std::invalid_argument("Engine.decide: times needs 8 float64");
                const float* s = data_or_null<float>(scores);
                const int T = s ? (int)py::cast<py::array>(scores).shape(0) : 0;
                const int64_t* re = data_or_null<int64_t>(ready_e);
                const double* rt = data_or_null<double>(ready_t);
                const int n_ready = re ? (int)py::cast<py::array>(ready_e).size() : 0;
                const int64_t* pe = ex.data();
                const int64_t* pc = cnt.data();
                int32_t* po = out.mutable_data();
                double* pt = times.mutable_data();
                py::gil_scoped_release nogil;
                g.decide(layer, mode, pe, pc, n, s, T, pcie_busy, re, rt, n_ready, po, pt);
            },
            py::arg("layer"), py::arg("mode"), py::arg("experts"), py::arg("counts"), py::arg("scores"),
            py::arg("pcie_busy"), py::arg("ready_experts"), py::arg("ready_times"), py::arg("out"), py::arg("times"),
            "observe -> access -> plan -> pin -> admit for one layer (hybrimoe.step.decide's twin); GIL released.")
        .def("set_prefetch_seed", &Engine::set_prefetch_seed)
        .def(
            "prefetch",
            [](Engine& g, int layer, py::array_t<int64_t, py::array::c_style> tls, py::array_t<int64_t, py::array::c_style> off,
               py::array_t<int64_t, py::array::c_style> exp, py::array_t<int64_t, py::array::c_style> cnt,
               py::array_t<double, py::array::c_style> prob, py::array_t<double, py::array::c_style> idle, int prefetch_size,
               int horizon, int mode, double min_gain, py::array_t<int64_t, py::array::c_style> out_i,
               py::array_t<double, py::array::c_style> out_d) {
                const int n_t = (int)tls.size();
                if (off.size() != n_t + 1 || idle.size() != n_t) throw std::invalid_argument("Engine.prefetch: shapes");
                const int64_t n_e = off.data()[n_t];
                if (exp.size() != n_e || cnt.size() != n_e || prob.size() != n_e)
                    throw std::invalid_argument("Engine.prefetch: experts/counts/probs must have off[-1] entries");
                if (out_i.size() < 5 * (py::ssize_t)std::max(prefetch_size, 0) ||
                    out_d.size() < 2 * (py::ssize_t)std::max(prefetch_size, 0))
                    throw std::invalid_argument("Engine.prefetch: output buffers too small");
                const int64_t *a = tls.data(), *b = off.data(), *c = exp.data(), *d = cnt.data();
                const double *p = prob.data(), *q = idle.data();
                int64_t* oi = out_i.mutable_data();
                double* od = out_d.mutable_data();
                py::gil_scoped_release nogil;
                return g.prefetch(layer, n_t, a, b, c, d, p, q, prefetch_size, horizon, mode, min_gain, oi, od);
            },
            "Prefetcher.choose + admission (hybrimoe.step.prefetch's twin); GIL released.")
        .def("stats", &Engine::stats)
        .def("used_by_layer", &Engine::used_by_layer)
        .def("wasted_by_layer", &Engine::wasted_by_layer)
        .def("scores", &Engine::scores)
        .def("freq", &Engine::freq);
    m.attr("DECIDE_HEADER_BYTES") = sizeof(DecideHeader);
}
