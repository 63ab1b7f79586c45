"""Per MoE layer: where each activated expert runs, and when the three lanes finish.

    plan(layer, expert_ids, token_counts, cache, costs, mode) -> Plan

Each activated expert goes to exactly one place:
    'gpu'   resident in a GPU slot (cache hit), computed there
    'load'  not resident: copied host -> GPU over PCIe, then computed on the GPU
    'cpu'   computed by the CPU pool from host memory (resident or not)

Times are seconds from the start of the layer's MoE phase (router output known). Lanes:
    PCIe  loads one after another, starting when the link is free (`pcie_busy`)
    GPU   one layer launch overhead, then hits (highest token count first), then loads in
          transfer order, each starting no earlier than its weights are there
    CPU   one layer overhead (submit/join), then its experts back to back
makespan = max(cpu_end, gpu_end); pcie_end is when the link goes idle (prefetch may use it after).

Modes:
    hybrid     HybriMoE's greedy (paper sec. 4.2, Alg. 1) on the calibrated cost model. Queue =
               resident experts by token count descending, then non-resident by count descending.
               The GPU takes from the front (a resident one directly, a non-resident one after its
               transfer on the PCIe lane), the CPU from the back (lowest load first). At each step
               the side whose finish time after taking its candidate is smaller takes it, so
               transfers continue only while the loaded expert finishes before the CPU would.
    kt-static  resident -> GPU, everything else -> CPU (kTransformers' fixed split)
    gpu-only   resident -> GPU, everything else loaded on demand (offloading a la Accelerate/MoE-Infinity)
    cpu-only   every routed expert on the CPU (llama.cpp with -ngl for dense parts only)
    seed       the released HybriMoE rule (KExpertsCache.calc_experts / HSS in
               PKU-SEC-Lab/HybriMoE ktransformers/operators/experts.py@508a85b): prefill (more than
               one token) -> gpu-only; decode -> the same two-ended greedy with the code's CONSTANT
               unit-free costs: GPU 0.5 per expert, CPU coef * tokens (+0.79 on the first CPU
               expert), transfer 0.418, a transfer delaying the GPU only past the GPU's own work.
               coef = 1 (DeepSeek, the active value), 0.2 (Mixtral), 0.8 (Qwen2) per its comments.
               Its plan is then timed with the real cost model like every other mode.

Only `cache.contains(layer, expert)` is used, so a hypothetical cache (`CacheView`) works too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from .costs import CostModel
from .errors import HybrimoeError

MODES = ("hybrid", "kt-static", "gpu-only", "cpu-only", "seed")
# seed HSS constants: gpu per expert, cpu coefficient per token, cpu intercept, transfer
SEED_CONSTANTS = {"deepseek": (0.5, 1.0, 0.79, 0.41791011235117914),
                  "mixtral": (0.5, 0.2, 0.79, 0.41791011235117914),
                  "qwen2": (0.5, 0.8, 0.79, 0.41791011235117914)}


class ScheduleError(HybrimoeError, ValueError):
    """Bad scheduler input (unknown mode, counts that do not match ids) or a broken plan."""


class CacheView:
    """A cache as the scheduler sees it, plus `extra` experts of one layer assumed resident."""

    def __init__(self, cache, layer: int, extra: Iterable[int] = ()):
        self.cache, self.layer, self.extra = cache, layer, set(int(e) for e in extra)

    def contains(self, layer: int, expert: int) -> bool:
        return (layer == self.layer and expert in self.extra) or self.cache.contains(layer, expert)


@dataclass(frozen=True)
class Plan:
    layer: int
    mode: str
    gpu: tuple[int, ...]  # resident experts computed on the GPU, in execution order
    loads: tuple[int, ...]  # non-resident experts loaded then computed on the GPU, transfer order
    cpu: tuple[int, ...]  # experts computed on the CPU
    counts: Mapping[int, int]  # tokens per activated expert
    cpu_end: float
    gpu_end: float
    pcie_end: float
    makespan: float
    events: tuple = field(default=(), compare=False)  # (lane, expert, start, end), for timelines

    def where(self, expert: int) -> str:
        if expert in self.gpu:
            return "gpu"
        if expert in self.loads:
            return "load"
        if expert in self.cpu:
            return "cpu"
        raise KeyError(f"expert {expert} is not activated in layer {self.layer}")

    def check(self, cache) -> None:
        """Raise ScheduleError unless every activated expert is placed exactly once, hits are
        resident and loads are not."""
        placed = list(self.gpu) + list(self.loads) + list(self.cpu)
        if sorted(placed) != sorted(self.counts):
            raise ScheduleError(f"layer {self.layer} {self.mode}: placed {sorted(placed)} "
                                f"(expected each of {sorted(self.counts)} exactly once)")
        bad = [e for e in self.gpu if not cache.contains(self.layer, e)]
        bad += [e for e in self.loads if cache.contains(self.layer, e)]
        if bad:
            raise ScheduleError(f"layer {self.layer} {self.mode}: experts {bad} are hits that are not "
                                "resident or loads that already are")


def _lanes(lc, gpu, loads, cpu, counts, pcie_busy, ready, ev=None) -> tuple[float, float, float]:
    """(cpu_end, gpu_end, pcie_end) of a placement on one layer's costs (lanes as in the module
    docstring); appends (lane, expert, start, end) to `ev` when given."""
    t_pcie = pcie_busy
    arrive = {}
    for e in loads:
        start, t_pcie = t_pcie, t_pcie + lc.transfer_s
        arrive[e] = t_pcie
        if ev is not None:
            ev.append(("pcie", e, start, t_pcie))
    t_gpu = lc.gpu_layer_overhead if (gpu or loads) else 0.0
    for e in (*gpu, *loads):
        start = max(t_gpu, arrive.get(e, ready.get(e, 0.0)))
        t_gpu = start + lc.gpu_time(counts[e])
        if ev is not None:
            ev.append(("gpu", e, start, t_gpu))
    t_cpu = lc.cpu_layer_overhead if cpu else 0.0
    for e in cpu:
        start, t_cpu = t_cpu, t_cpu + lc.cpu_time(counts[e])
        if ev is not None:
            ev.append(("cpu", e, start, t_cpu))
    return t_cpu, t_gpu, max(t_pcie, pcie_busy)


def timeline(layer: int, gpu: Sequence[int], loads: Sequence[int], cpu: Sequence[int],
             counts: Mapping[int, int], costs: CostModel, *, pcie_busy: float = 0.0,
             ready: Mapping[int, float] | None = None, mode: str = "", with_events: bool = False) -> Plan:
    """Time a given placement on the cost model (lanes as in the module docstring)."""
    ev = [] if with_events else None
    t_cpu, t_gpu, t_pcie = _lanes(costs.layer(layer), gpu, loads, cpu, counts, pcie_busy, ready or {}, ev)
    return Plan(layer, mode, tuple(gpu), tuple(loads), tuple(cpu), dict(counts), t_cpu, t_gpu, t_pcie,
                max(t_cpu, t_gpu), tuple(ev or ()))


def _greedy(layer, queue, cached, counts, costs, pcie_busy, ready):
    """Two-ended greedy on the real cost model (mode 'hybrid'). Returns gpu, loads, cpu lists."""
    lc = costs.layer(layer)
    gpu, loads, cpu = [], [], []
    t_gpu = t_cpu = 0.0
    t_pcie = pcie_busy
    lo, hi = 0, len(queue) - 1
    while lo <= hi:
        f, b = queue[lo], queue[hi]
        base = t_gpu if (gpu or loads) else lc.gpu_layer_overhead
        if f in cached:
            g_end = max(base, ready.get(f, 0.0)) + lc.gpu_time(counts[f])
        else:
            g_end = max(base, t_pcie + lc.transfer_s) + lc.gpu_time(counts[f])
        c_end = (t_cpu if cpu else lc.cpu_layer_overhead) + lc.cpu_time(counts[b])
        if g_end <= c_end:
            if f in cached:
                gpu.append(f)
            else:
                loads.append(f)
                t_pcie += lc.transfer_s
            t_gpu = g_end
            lo += 1
        else:
            cpu.append(b)
            t_cpu = c_end
            hi -= 1
    return gpu, loads, cpu


def _seed_hss(queue, cached, counts, consts):
    """The released HSS loop, verbatim in logic, on its constant costs."""
    g_unit, c_coef, c_icpt, move = consts
    gpu, loads, cpu = [], [], []
    g_tot = c_tot = m_tot = 0.0
    lo, hi = 0, len(queue) - 1
    while lo <= hi:
        f, b = queue[lo], queue[hi]
        is_move = f not in cached
        g_time = g_unit
        c_time = c_coef * counts[b] + (c_icpt if not cpu else 0.0)
        if is_move and m_tot + move > g_tot:
            g_time += m_tot + move - g_tot
        if g_tot + g_time <= c_tot + c_time:
            if is_move:
                m_tot += move
                loads.append(f)
            else:
                gpu.append(f)
            g_tot += g_time
            lo += 1
        else:
            c_tot += c_time
            cpu.append(b)
            hi -= 1
    return gpu, loads, cpu


def plan(layer: int, expert_ids: Sequence[int] | np.ndarray, token_counts: Sequence[int] | np.ndarray,
         cache, costs: CostModel, mode: str = "hybrid", *, pcie_busy: float = 0.0,
         ready: Mapping[int, float] | None = None, seed_model: str = "deepseek",
         with_events: bool = False) -> Plan:
    """Place the layer's activated experts.

    expert_ids: (n,) distinct activated experts; token_counts: (n,) tokens routed to each (>= 1).
    cache: anything with contains(layer, expert). pcie_busy: seconds until the link is free.
    ready: {resident expert: seconds until its (prefetched) weights have arrived}, default 0.
    """
    if mode not in MODES:
        raise ScheduleError(f"unknown schedule mode {mode!r} (expected one of {MODES})")
    ids = np.asarray(expert_ids).ravel().astype(np.int64, copy=False).tolist()
    cnt = np.asarray(token_counts).ravel().astype(np.int64, copy=False).tolist()
    if len(ids) != len(cnt) or len(set(ids)) != len(ids):
        raise ScheduleError(f"layer {layer}: expert_ids {ids} must be distinct and match token_counts {cnt}")
    counts = dict(zip(ids, cnt))
    ready = ready or {}
    cached = {e for e in ids if cache.contains(layer, e)}
    # front of the queue: resident by load descending, then non-resident by load descending
    key = lambda e: (-counts[e], e)  # noqa: E731
    queue = sorted(cached, key=key) + sorted(set(ids) - cached, key=key)
    gpu, loads, cpu = _place(layer, queue, cached, counts, costs, mode, pcie_busy, ready, seed_model)
    return timeline(layer, gpu, loads, cpu, counts, costs, pcie_busy=pcie_busy, ready=ready, mode=mode,
                    with_events=with_events)


def _place(layer, queue, cached, counts, costs, mode, pcie_busy, ready, seed_model):
    """(gpu, loads, cpu) of `mode` for a queue (resident by load descending, then the rest)."""
    if mode == "hybrid":
        return _greedy(layer, queue, cached, counts, costs, pcie_busy, ready)
    if mode == "kt-static":
        return [e for e in queue if e in cached], [], [e for e in queue if e not in cached]
    if mode == "gpu-only":
        return [e for e in queue if e in cached], [e for e in queue if e not in cached], []
    if mode == "cpu-only":
        return [], [], list(queue)
    if seed_model not in SEED_CONSTANTS:  # seed
        raise ScheduleError(f"seed_model {seed_model!r} (expected one of {sorted(SEED_CONSTANTS)})")
    if max((counts[e] for e in queue), default=1) > 1:  # the released code: prefill never uses the CPU
        return [e for e in queue if e in cached], [e for e in queue if e not in cached], []
    return _seed_hss(queue, cached, counts, SEED_CONSTANTS[seed_model])


def makespan(layer: int, resident_counts: Sequence[int], other_counts: Sequence[int], costs: CostModel,
             mode: str = "hybrid", *, pcie_busy: float = 0.0, seed_model: str = "deepseek") -> float:
    """`plan(...).makespan` from token counts alone, without building a Plan: the layer's
    activated experts are given as the token counts of the resident ones and of the others (any
    order). A plan's makespan depends on the experts only through these (ids just break ties
    between equal counts), so this equals plan() on any ids with these counts; the prefetcher
    evaluates many hypothetical caches with it (6.8 vs 11.5 us for plan at 6 experts, 2-core box)."""
    hits = sorted(resident_counts, reverse=True)
    n_hits = len(hits)
    counts = dict(enumerate(hits + sorted(other_counts, reverse=True)))
    queue = list(counts)
    cached = set(range(n_hits))
    gpu, loads, cpu = _place(layer, queue, cached, counts, costs, mode, pcie_busy, {}, seed_model)
    t_cpu, t_gpu, _ = _lanes(costs.layer(layer), gpu, loads, cpu, counts, pcie_busy, {})
    return max(t_cpu, t_gpu)
