"""One MoE layer's decisions, in the one order the runtime and the simulator both take them.

    decide():   observe -> access -> plan -> pin -> admit      (before the layer's experts run)
    prefetch(): choose -> admit (prefetch)                     (while they run)
    release():  unpin                                          (after they ran)

`HybridRuntime` (hybrimoe.layer) and `simulate` (hybrimoe.sim) both call these three functions,
so a decision cannot mean one thing in a run and another in a simulation:

- observe: the router scores update the MRS scores (skipped when `scores` is None: a policy
  other than mrs ignores them); the prefetcher scores its earlier prediction for this layer.
- access: hits and misses are counted, recency and frequency updated.
- plan: `scheduler.plan` places each activated expert: gpu (resident), load, or cpu.
- pin: every activated expert of the layer is pinned, so no load or prefetch of this layer
  evicts an expert the layer is using.
- admit: each planned load takes a slot, in transfer order. A load the cache refuses (no free
  slot and nothing it may evict: every resident expert of the pool is pinned or protected, or a
  static cache's fixed set) runs on the CPU: it leaves the plan's loads for its CPU list, and the
  plan is timed again for what will really run (`LayerDecision.plan`; the scheduler's own plan
  stays in `LayerDecision.planned`).

Numpy only (no torch), like the cache, costs, scheduler and prefetch modules it drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .prefetch import Prediction, PrefetchOrder
from .scheduler import Plan, plan as make_plan, timeline


@dataclass(frozen=True)
class LayerDecision:
    """What `decide` chose for one layer at one step.

    experts / counts: activated experts (ascending) and tokens per expert. hits: how many were
    resident. planned: the scheduler's plan. plan: what runs (planned, with refused loads on the
    CPU, re-timed when there were any). slots: {expert: slot} of every expert computed on the GPU
    (hits in plan order, then admitted loads). loads: ((expert, slot), ...) admitted demand loads in
    transfer order. refused: planned loads the cache refused (run on the CPU). evicted: the
    (layer, expert) keys the loads evicted, in order."""

    layer: int
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    hits: int
    planned: Plan
    plan: Plan
    slots: Mapping[int, int]
    loads: tuple[tuple[int, int], ...]
    refused: tuple[int, ...]
    evicted: tuple[tuple[int, int], ...]

    def key(self) -> tuple:
        """Everything decided, as plain values (comparisons between two drivers of the sequence)."""
        p, q = self.planned, self.plan
        return (self.layer, self.experts, self.counts, self.hits, (p.gpu, p.loads, p.cpu), (q.gpu, q.loads, q.cpu),
                tuple(self.slots.items()), self.loads, self.refused, self.evicted)


@dataclass(frozen=True)
class PrefetchDecision:
    """A prefetch the cache admitted: the prefetcher's order, the slot it took, what it evicted."""

    order: PrefetchOrder
    slot: int
    evicted: tuple[int, int] | None


def decide(cache, costs, mode: str, layer: int, experts, counts, scores: np.ndarray | None = None, *,
           prefetcher=None, pcie_busy: float = 0.0, ready: Mapping[int, float] | None = None,
           seed_model: str = "deepseek", with_events: bool = False) -> LayerDecision:
    """observe -> access -> plan -> pin -> admit for `layer` (see the module docstring).

    experts: (n,) distinct activated experts, ascending; counts: (n,) tokens per expert.
    scores: (T, E) router scores for the MRS update, or None. pcie_busy / ready: as scheduler.plan.
    The layer stays pinned until `release(cache, layer)`."""
    experts = np.asarray(experts, np.int64).ravel()
    if getattr(cache, "native", False):  # hybrimoe.engine.NativeCache: the same sequence in one native call
        return _decide_native(cache, costs, mode, layer, experts, counts, scores, prefetcher, pcie_busy, ready,
                              seed_model, with_events)
    if scores is not None:
        cache.observe(layer, scores)
    if prefetcher is not None:
        prefetcher.record(layer, experts)
    if getattr(cache, "profiling", False):  # a prompt's profile is open (policy profiled; hybrimoe.cache)
        cache.record_profile(layer, experts, counts)
    hits = sum(s is not None for s in cache.access(layer, experts))
    planned = make_plan(layer, experts, counts, cache, costs, mode, pcie_busy=pcie_busy, ready=ready,
                        seed_model=seed_model, with_events=with_events)
    cache.pin(layer, experts)
    slots = {e: cache.lookup(layer, e) for e in planned.gpu}
    loads, refused, evicted = [], [], []
    for e in planned.loads:
        slot, ev = cache.admit(layer, e, protect=experts)
        if slot is None:
            refused.append(e)
            continue
        loads.append((e, slot))
        slots[e] = slot
        if ev is not None:
            evicted.append(ev)
    p = planned
    if refused:
        p = timeline(layer, planned.gpu, [e for e, _ in loads], (*planned.cpu, *refused), planned.counts, costs,
                     pcie_busy=pcie_busy, ready=ready, mode=mode, with_events=with_events)
    if prefetcher is not None:
        prefetcher.note_loads(layer, len(loads))
    return LayerDecision(layer, tuple(experts.tolist()), tuple(int(c) for c in np.asarray(counts).ravel()), hits,
                         planned, p, slots, tuple(loads), tuple(refused), tuple(evicted))


def _decide_native(cache, costs, mode, layer, experts, counts, scores, prefetcher, pcie_busy, ready, seed_model,
                   with_events) -> LayerDecision:
    if prefetcher is not None:
        prefetcher.record(layer, experts)
    h, li, t = cache.decide(costs, mode, layer, experts, counts, scores, pcie_busy=pcie_busy, ready=ready,
                            seed_model=seed_model)
    ex = tuple(experts.tolist())
    cnt = tuple(counts.tolist()) if isinstance(counts, np.ndarray) else tuple(int(c) for c in counts)
    cmap = dict(zip(ex, cnt))
    gpu, loads, cpu = tuple(li["gpu"]), tuple(li["loads"]), tuple(li["cpu"])
    admitted, a_slots, refused = li["admitted"], li["admitted_slots"], tuple(li["refused"])
    if with_events:  # the lanes' events: the same placement timed again (the times are equal)
        planned = timeline(layer, gpu, loads, cpu, cmap, costs, pcie_busy=pcie_busy, ready=ready, mode=mode,
                           with_events=True)
    else:
        planned = Plan(layer, mode, gpu, loads, cpu, cmap, t[0], t[1], t[2], t[3])
    p = planned
    if refused:
        cpu_final = tuple(li["cpu_final"])
        if with_events:
            p = timeline(layer, gpu, admitted, cpu_final, cmap, costs, pcie_busy=pcie_busy, ready=ready, mode=mode,
                         with_events=True)
        else:
            p = Plan(layer, mode, gpu, tuple(admitted), cpu_final, cmap, t[4], t[5], t[6], t[7])
    slots = dict(zip(gpu, li["gpu_slots"]))
    slots.update(zip(admitted, a_slots))
    if prefetcher is not None:
        prefetcher.note_loads(layer, len(admitted))
    ev = li["evicted"]
    return LayerDecision(layer, ex, cnt, h[0], planned, p, slots, tuple(zip(admitted, a_slots)), refused,
                         tuple(zip(ev[0::2], ev[1::2])))


def prefetch(cache, prefetcher, layer: int, predictions: Mapping[int, Prediction], *,
             idle_before: Mapping[int, float]) -> list[PrefetchDecision]:
    """The prefetcher's choice for the layers after `layer`, admitted into the cache (each never
    evicting a pinned expert or a predicted one of its target layer); orders the cache refuses
    are dropped."""
    if getattr(cache, "native", False):  # hybrimoe.engine.NativeCache: choice and admission in one call
        if prefetcher.prefetch_mode != "impact":
            raise ValueError(f"the native engine chooses prefetches in mode 'impact' only, not "
                             f"{prefetcher.prefetch_mode!r} (use the Python policies: engine 'python')")
        return cache.prefetch(prefetcher, layer, predictions, idle_before)
    out = []
    for o in prefetcher.choose(layer, predictions, cache, idle_before=idle_before):
        slot, ev = cache.admit(o.layer, o.expert, prefetch=True, protect=predictions[o.layer].experts)
        if slot is not None:
            out.append(PrefetchDecision(o, slot, ev))
    return out


@dataclass(frozen=True)
class FillDecision:
    """A fill the cache admitted: `expert` of `layer`, computed on the CPU this step, copied into
    `slot` in idle link time for the layer's later steps; `evicted` the key it replaced."""

    layer: int
    expert: int
    slot: int
    evicted: tuple[int, int] | None
    transfer: float  # seconds of link time

    def key(self) -> tuple:
        return (self.layer, self.expert, self.slot, self.evicted)


def fill(cache, costs, decision: LayerDecision, *, idle_s: float) -> list[FillDecision]:
    """Admission policies (cache.ADMISSION_POLICIES) only: copy experts the layer computed on the
    CPU into the cache while the link is idle, best predicted reuse first, each only when the
    cache's gate admits it over its victim, as long as the transfers fit in `idle_s` seconds.
    Call after `decide` and the prefetcher's choice (a prefetch is for this token, a fill for a
    later one; the fills see the prefetches as backlog) and before `release` (the layer's experts
    are pinned). Other policies, and the cpu-only schedule: no fills."""
    from .cache import ADMISSION_POLICIES

    if getattr(cache, "policy", None) not in ADMISSION_POLICIES or decision.plan.mode == "cpu-only":
        return []  # (cpu-only never computes on the GPU: a resident expert would only cost the copy)
    layer = decision.layer
    tr = costs.transfer_time(layer)
    if idle_s < tr:
        return []
    cands = sorted((e for e in decision.plan.cpu if not cache.contains(layer, e)),
                   key=lambda e: (-cache.reuse_score(layer, e), e))
    out, used = [], 0.0
    for e in cands:
        if used + tr > idle_s:
            break
        if not cache.wants_fill(layer, e, protect=decision.experts):
            continue
        slot, ev = cache.admit(layer, e, fill=True, protect=decision.experts)
        if slot is None:
            continue
        used += tr
        out.append(FillDecision(layer, int(e), slot, ev, tr))
    return out


class FillSpan:
    """How many layers' idle windows a fill issued after a layer may use: 1 plus the following
    layers (cyclically: a fill is for the layer's next step) that lately made no demand loads,
    so fills queue only where no demand load is expected. `update` after each layer's decision."""

    def __init__(self, n_layers: int, decay: float = 0.9, quiet: float = 0.05):
        self.ema = np.zeros(n_layers)  # per layer: how often its steps made demand loads lately
        self.decay, self.quiet = float(decay), float(quiet)

    def update(self, decision: LayerDecision) -> None:
        i = decision.layer
        self.ema[i] = self.decay * self.ema[i] + (1.0 - self.decay) * (len(decision.loads) > 0)

    def span(self, layer: int) -> int:
        L, s = len(self.ema), 1
        while s < L and self.ema[(layer + s) % L] < self.quiet:
            s += 1
        return s


@dataclass(frozen=True)
class PlaceDecision:
    """A placement move: `expert` of `layer` copied into `slot` (prefetch-class link traffic),
    replacing `evicted` (None: a free slot); `benefit` the expected decode seconds it saves over
    the victim, `transfer` the seconds of link time it costs."""

    layer: int
    expert: int
    slot: int
    evicted: tuple[int, int] | None
    benefit: float
    transfer: float

    def key(self) -> tuple:
        return (self.layer, self.expert, self.slot, self.evicted)


def place(cache, costs, decode_tokens: float, mode: str = "hybrid") -> list[PlaceDecision]:
    """Prompt-profiled placement (policy 'profiled'): close the prompt's profile and move experts
    in where it pays. Call once between a prompt's prefill and its decode (the runtime's
    `begin_decode`, the simulator's first decode step), with no layer pinned.

    p[l, e] = the profile's per-token use probability (cache.end_profile); a decode token that
    finds e resident saves s_l = cpu_time(l, 1) - gpu_time(l, 1) (cost model: the expert runs on
    the GPU instead of the CPU). Value v(l, e) = p[l, e] * s_l per decode token. Per pool, the
    non-resident experts by value (highest first) are paired with the free slots, then the
    residents by value (lowest first); the i-th candidate c replaces the i-th victim v only when

        decode_tokens * (v(c) - v(v)) > transfer_time(l_c)

    (its expected decode benefit over the expected decode length beats its copy's link time);
    the first pair that fails ends the pool's moves (later pairs gain less). Moves are returned
    (and should be copied) layer by layer, the first decode layer first. Other policies, the
    cpu-only schedule, no profile or no decode: none (the profile is still closed)."""
    p = cache.end_profile()
    if p is None or cache.policy != "profiled" or mode == "cpu-only" or decode_tokens <= 0:
        return []
    L = cache.n_layers
    save = np.array([max(0.0, costs.cpu_time(lay, 1) - costs.gpu_time(lay, 1)) for lay in range(L)])
    val = p * save[:, None]
    pools: dict[int, list[int]] = {}
    for lay in range(L):
        pools.setdefault(cache._pool(lay), []).append(lay)
    moves = []
    for pool, layers in pools.items():
        res = cache._res[pool]
        cands = sorted(((lay, e) for lay in layers for e in range(cache.n_experts)
                        if (lay, e) not in res and p[lay, e] > 0), key=lambda k: (-val[k], k))
        victims: list = [None] * len(cache._free[pool])
        victims += sorted((k for k in res if k not in cache._pinned), key=lambda k: (val[k], k))
        for c, v in zip(cands, victims):
            tr = costs.transfer_time(c[0])
            gain = decode_tokens * (val[c] - (val[v] if v is not None else 0.0))
            if not gain > tr:
                break
            moves.append((c, v, gain, tr))
    moves.sort(key=lambda m: (m[0][0], -val[m[0]], m[0][1]))
    out = []
    for c, v, gain, tr in moves:
        slot = cache.place_move(c[0], c[1], v)
        out.append(PlaceDecision(c[0], c[1], slot, v, float(gain), float(tr)))
    return out


def release(cache, layer: int) -> None:
    """The layer's experts ran: they may be evicted again."""
    cache.unpin(layer)
