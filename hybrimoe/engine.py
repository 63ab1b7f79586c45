"""The native per-layer decision engine (kernels/cpu/engine.cpp) behind the ExpertCache interface.

    cache = NativeCache.from_cache(ExpertCache(...), costs)   # same residents, slots, ticks
    d = step.decide(cache, costs, mode, layer, experts, counts, scores)   # ONE native call

`NativeCache` keeps the cache's state in C++ and answers the calls the rest of the runtime makes
on an ExpertCache (contains, lookup, resident, can_admit, admit, access, observe, pin, unpin,
stats, ...), so the Python prefetcher and the transfer bookkeeping work on it unchanged. Its
`decide` does observe -> access -> plan -> pin -> admit in one call with the GIL released (the
C++ twin of hybrimoe.step.decide with hybrimoe.scheduler.plan); the Python policies stay the
readable reference and tests/test_engine.py requires identical decisions step by step.

The cost model stays calibrated in Python and reaches the engine as numbers: per cost layer,
cpu_time(n) and gpu_time(n) for n = 0..N (tables, grown when a layer sees more tokens), the
transfer time and the two layer overheads.

`prefetch` does hybrimoe.step.prefetch (Prefetcher.choose, then each order admitted) in one call
too; the Prefetcher object keeps its Python bookkeeping (prediction accuracy, orders issued).
Not native yet: the CPU job's submission (hybrimoe.cpu) and the look-ahead predictions.
"""

from __future__ import annotations

import numpy as np

from .cache import CacheConfigError, ExpertCache
from .prefetch import PrefetchOrder
from .scheduler import MODES, SEED_CONSTANTS, ScheduleError
from .step import PrefetchDecision

# The policies the engine implements, in the order of its policy codes (engine.cpp). Of the
# admission policies (hybrimoe.cache) the engine runs bypass (its windowed frequency, gate and the
# cache side of fills: reuse_score, wants_fill, admit(fill=True)); profiled and min have only
# their Python implementation.
ENGINE_POLICIES = ("mrs", "lru", "lfu", "static", "bypass")

# struct DecideHeader (kernels/cpu/engine.h): the counts at the head of decide()'s int32 output
HEADER_FIELDS = ("hits", "n_gpu", "n_loads", "n_cpu", "n_admitted", "n_refused", "n_evicted", "n_cpu_final")
HEADER_DTYPE = np.dtype([(f, np.int32) for f in HEADER_FIELDS])
assert HEADER_DTYPE.itemsize == 32


def _ext():
    from . import cpu

    return cpu._ext()


def available() -> bool:
    """Is the engine built (the hybrimoe._cpu extension with engine.cpp)?"""
    try:
        return hasattr(_ext(), "Engine")
    except Exception:  # noqa: BLE001 - not built
        return False


class NativeCache:
    """An ExpertCache whose state and per-layer decisions live in the native engine."""

    native = True

    def __init__(self, like: ExpertCache, costs):
        c = like
        self.origin = like  # the Python cache it started from (left as it was: the engine owns the state now)
        if c.policy not in ENGINE_POLICIES:
            raise CacheConfigError(f"the native engine runs the cache policies {ENGINE_POLICIES}, not {c.policy!r} "
                                   "(its decisions are made by hybrimoe.cache's Python implementation)")
        self.n_layers, self.n_experts, self.policy = c.n_layers, c.n_experts, c.policy
        self.shared, self.capacity, self.expert_bytes = c.shared, c.capacity, c.expert_bytes
        self.slot_bytes = c.slot_bytes
        self.byte_budget = getattr(c, "byte_budget", None)
        self.top_p, self.alpha, self.guard_prefetch = c.top_p, c.alpha, c.guard_prefetch
        self.window, self.gate_demand = c.window, c.gate_demand
        ext = _ext()
        self._g = ext.Engine(c.n_layers, c.n_experts, ENGINE_POLICIES.index(c.policy), c.shared, list(c.capacity), c.alpha,
                             c.top_p, c.guard_prefetch, float(c.window), bool(c.gate_demand))
        if c._pinned or c._prefetched or c.hits or c.misses or c.evictions or c.fills or c.wfreq.any():
            raise CacheConfigError("NativeCache.from_cache takes a fresh cache (warm start only: no pins, "
                                   "prefetches or statistics yet)")
        res = [(lay, e, s) for pool in c._res for (lay, e), s in pool.items()]
        last = np.zeros((c.n_layers, c.n_experts), np.int64)
        for (lay, e), t in c._last.items():
            last[lay, e] = t
        self._g.load_state(np.asarray(res, np.int64).reshape(-1, 3), [list(f) for f in c._free], last.ravel(),
                           int(c._tick), c._hot is not None)
        self._out = np.zeros(16 + 8 * c.n_experts, np.int32)
        self._times = np.zeros(8, np.float64)
        self._costs = None
        self._table_n = 0
        self._seed_model = None
        self._pseed = None
        self._pf_i, self._pf_d = np.zeros(0, np.int64), np.zeros(0, np.float64)
        self.set_costs(costs)

    @classmethod
    def from_cache(cls, cache: ExpertCache, costs) -> "NativeCache":
        return cls(cache, costs)

    # ------------------------------------------------------------------ costs as numbers
    def set_costs(self, costs, n: int = 256) -> None:
        """Hand the cost model to the engine: per cost layer, tables of cpu/gpu time at 0..n tokens."""
        n = max(int(n), 16)
        self._costs, self._table_n = costs, n
        ns = range(n + 1)
        for j, lc in enumerate(costs.layers):
            cpu = np.array([0.0] + [lc.cpu_time(k) for k in ns[1:]], np.float64)
            gpu = np.array([0.0] + [lc.gpu_time(k) for k in ns[1:]], np.float64)
            self._g.set_costs(j, cpu, gpu, float(lc.transfer_s), float(lc.cpu_layer_overhead),
                              float(lc.gpu_layer_overhead))

    def _seed(self, seed_model: str) -> None:
        if seed_model != self._seed_model:
            if seed_model not in SEED_CONSTANTS:
                raise ScheduleError(f"seed_model {seed_model!r} (expected one of {sorted(SEED_CONSTANTS)})")
            self._g.set_seed(*SEED_CONSTANTS[seed_model])
            self._seed_model = seed_model

    # ------------------------------------------------------------------ one layer, one call
    def decide(self, costs, mode: str, layer: int, experts: np.ndarray, counts: np.ndarray, scores, *,
               pcie_busy: float = 0.0, ready=None, seed_model: str = "deepseek"):
        """observe -> access -> plan -> pin -> admit in the engine. Returns (header, lists, times):
        header (8 ints, HEADER_FIELDS), lists {name: list of ints} (engine.h's lists), times (8
        floats: planned cpu_end, gpu_end, pcie_end, makespan; then the final plan's)."""
        if mode not in MODES:
            raise ScheduleError(f"unknown schedule mode {mode!r} (expected one of {MODES})")
        if costs is not self._costs:
            self.set_costs(costs, self._table_n)
        ex = experts if experts.dtype == np.int64 and experts.flags.c_contiguous else np.ascontiguousarray(experts,
                                                                                                          np.int64)
        cnt = np.ascontiguousarray(counts, np.int64)
        n = ex.size
        if mode == "seed":
            self._seed(seed_model)
        if scores is not None:
            if scores.dtype != np.float32 or not scores.flags.c_contiguous:
                scores = np.ascontiguousarray(scores, np.float32)
            if scores.ndim == 1:
                scores = scores[None]
            if scores.ndim != 2 or scores.shape[1] != self.n_experts:
                raise CacheConfigError(f"observe(layer {layer}): scores (expected (T, {self.n_experts}), "
                                       f"found {scores.shape})")
        re = rt = None
        if ready:
            re = np.fromiter(ready.keys(), np.int64, len(ready))
            rt = np.fromiter(ready.values(), np.float64, len(ready))
        try:
            self._g.decide(layer, MODES.index(mode), ex, cnt, scores, pcie_busy, re, rt, self._out, self._times)
        except IndexError:  # a token count beyond the cost tables (checked before any state changed)
            if not n or int(cnt.min()) < 1:
                raise ScheduleError(f"layer {layer}: token counts must be >= 1, found {cnt.tolist()}") from None
            self.set_costs(costs, 1 << int(cnt.max()).bit_length())
            self._g.decide(layer, MODES.index(mode), ex, cnt, scores, pcie_busy, re, rt, self._out, self._times)
        o = self._out[:8 + 8 * n].tolist()
        h = o[:8]
        lists, k = {}, 8
        for name, m in (("gpu", h[1]), ("gpu_slots", h[1]), ("loads", h[2]), ("cpu", h[3]), ("admitted", h[4]),
                        ("admitted_slots", h[4]), ("refused", h[5]), ("evicted", 2 * h[6]), ("cpu_final", h[7])):
            lists[name] = o[k:k + m]
            k += m
        return h, lists, self._times.tolist()

    def prefetch(self, prefetcher, layer: int, predictions, idle_before) -> list:
        """Prefetcher.choose + admission in one engine call (hybrimoe.step.prefetch's twin):
        [PrefetchDecision]. The prefetcher keeps its Python bookkeeping (predictions scored later
        by `record`, the count of orders issued)."""
        pf = prefetcher
        tl_list, ps, exp_l, cnt_l, prob_l, off_l = [], [], [], [], [], [0]
        for tl, p in predictions.items():
            e = p.experts.tolist() if isinstance(p.experts, np.ndarray) else [int(x) for x in p.experts]
            d = tl - layer
            if not 1 <= d <= pf.horizon:
                continue
            pf._last_pred[(tl, d)] = dict(zip(e, p.prob.tolist() if isinstance(p.prob, np.ndarray)
                                              else [float(x) for x in p.prob]))
            if idle_before.get(tl, 0.0) < pf.costs.transfer_time(tl):
                continue  # no prefetch for it fits in the link's idle time (the engine would skip it too)
            tl_list.append(int(tl))
            ps.append(p)
            exp_l += e
            cnt_l += p.counts.tolist() if isinstance(p.counts, np.ndarray) else [int(x) for x in p.counts]
            prob_l += p.prob.tolist() if isinstance(p.prob, np.ndarray) else [float(x) for x in p.prob]
            off_l.append(len(exp_l))
        if pf.prefetch_size <= 0 or not tl_list:
            return []
        if pf.costs is not self._costs:
            self.set_costs(pf.costs, self._table_n)
        if self._pseed is None:
            self._g.set_prefetch_seed(*SEED_CONSTANTS["deepseek"])  # scheduler.makespan's default
            self._pseed = True
        tls = np.array(tl_list, np.int64)
        off = np.array(off_l, np.int64)
        exp = np.array(exp_l, np.int64)
        cnt = np.array(cnt_l, np.int64)
        prob = np.array(prob_l, np.float64)
        idle = np.array([float(idle_before.get(t, 0.0)) for t in tl_list], np.float64)
        k = max(int(pf.prefetch_size), 0)
        if self._pf_i.shape[0] < 5 * k:
            self._pf_i, self._pf_d = np.zeros(5 * k, np.int64), np.zeros(2 * k, np.float64)
        try:
            n_chosen, n_out = self._g.prefetch(int(layer), tls, off, exp, cnt, prob, idle, k, int(pf.horizon),
                                               MODES.index(pf.mode), float(pf.min_gain), self._pf_i, self._pf_d)
        except IndexError:  # a predicted token count beyond the cost tables: grow them and retry
            self.set_costs(pf.costs, 1 << int(cnt.max()).bit_length())
            n_chosen, n_out = self._g.prefetch(int(layer), tls, off, exp, cnt, prob, idle, k, int(pf.horizon),
                                               MODES.index(pf.mode), float(pf.min_gain), self._pf_i, self._pf_d)
        pf.issued += n_chosen
        oi, od = self._pf_i[:5 * n_out].tolist(), self._pf_d[:2 * n_out].tolist()
        out = []
        for j in range(n_out):
            tl, e, slot, el, ee = oi[5 * j:5 * j + 5]
            out.append(PrefetchDecision(PrefetchOrder(tl, e, od[2 * j], od[2 * j + 1]), slot,
                                        None if el < 0 else (el, ee)))
        return out

    # ------------------------------------------------------------------ the ExpertCache interface
    def contains(self, layer: int, expert: int) -> bool:
        return self._g.contains(int(layer), int(expert))

    def lookup(self, layer: int, expert: int) -> int | None:
        s = self._g.lookup(int(layer), int(expert))
        return None if s < 0 else s

    def resident(self, layer: int) -> dict[int, int]:
        return dict(self._g.resident(int(layer)))

    def n_resident(self, layer: int | None = None) -> int:
        if layer is None:
            return sum(len(self._g.resident(j)) for j in range(self.n_layers))
        return len(self._g.resident(int(layer)))

    def can_admit(self, layer: int, expert: int, protect=(), prefetch: bool = True) -> bool:
        return self._g.can_admit(int(layer), int(expert), [int(e) for e in np.asarray(protect).ravel()], prefetch)

    def observe(self, layer: int, scores) -> None:
        s = np.asarray(scores)
        if s.ndim == 1:
            s = s[None]
        if s.shape[1] != self.n_experts:
            raise CacheConfigError(f"observe(layer {layer}): scores (expected (T, {self.n_experts}), found {s.shape})")
        self._g.observe(int(layer), s)

    def access(self, layer: int, experts) -> list[int | None]:
        ex = np.asarray(list(experts) if not isinstance(experts, np.ndarray) else experts, np.int64)
        out = [self.lookup(layer, e) for e in ex.tolist()]
        self._g.access(int(layer), ex)
        return out

    def admit(self, layer: int, expert: int, *, prefetch: bool = False, fill: bool = False, protect=()):
        slot, ev = self._g.admit(int(layer), int(expert), prefetch, np.asarray(protect, np.int64).ravel(), fill)
        if slot < 0:
            return None, None
        return slot, (None if ev < 0 else (int(ev // self.n_experts), int(ev % self.n_experts)))

    def pin(self, layer: int, experts) -> None:
        self._g.pin(int(layer), np.asarray(list(experts), np.int64))

    def unpin(self, layer: int, experts=None) -> None:
        if experts is None:
            self._g.unpin(int(layer))
        else:
            self._g.unpin_some(int(layer), [int(e) for e in experts])

    def reuse_score(self, layer: int, expert: int) -> float:
        return self._g.reuse_score(int(layer), int(expert))

    def wants_fill(self, layer: int, expert: int, protect=()) -> bool:
        return self._g.wants_fill(int(layer), int(expert), np.asarray(protect, np.int64).ravel())

    def stats(self) -> dict:
        # placed: what policy profiled counts (Python only); declined / fills come from the engine (bypass)
        return {**dict(self._g.stats()), "placed": 0}

    @property
    def wfreq(self) -> np.ndarray:
        return self._g.wfreq()

    @property
    def fills(self) -> int:
        return int(self._g.stats()["fills"])

    @property
    def declined(self) -> int:
        return int(self._g.stats()["declined"])

    @property
    def scores(self) -> np.ndarray:
        return self._g.scores()

    @property
    def freq(self) -> np.ndarray:
        return self._g.freq()

    @property
    def prefetch_used_by_layer(self) -> np.ndarray:
        return np.asarray(self._g.used_by_layer(), np.int64)

    @property
    def prefetch_wasted_by_layer(self) -> np.ndarray:
        return np.asarray(self._g.wasted_by_layer(), np.int64)

    def occupancy_bytes(self) -> int:
        if self.shared:
            return self.n_resident() * self.slot_bytes
        return sum(self.expert_bytes[j] * self.n_resident(j) for j in range(self.n_layers))
