"""Scheduler: placement invariants for every mode, and constructed cases where the hybrid plan
beats each baseline under a stated cost model."""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe.cache import ExpertCache
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.scheduler import MODES, CacheView, ScheduleError, makespan, plan, timeline

MS = 1e-3


def linear_costs(cpu=(1.0, 0.1), gpu=(0.1, 0.01), transfer=0.5, cpu_ovh=0.0, gpu_ovh=0.0) -> CostModel:
    """time(n) = a + b * (n - 1) ms on CPU and GPU; transfer ms per expert."""
    pts = (1, 1001)
    lc = LayerCost(pts, (cpu[0] * MS, (cpu[0] + 1000 * cpu[1]) * MS), (gpu[0] * MS, (gpu[0] + 1000 * gpu[1]) * MS),
                   transfer * MS, 1000, (), cpu_ovh * MS, gpu_ovh * MS)
    return CostModel((lc,), "test")


class FakeCache:
    def __init__(self, resident):
        self.res = set(resident)

    def contains(self, layer, e):
        return e in self.res


@pytest.mark.parametrize("mode", MODES)
def test_every_expert_once_and_loads_only_uncached(mode, rng):
    costs = CostModel.paper_a6000("deepseek-v2-lite")
    for _ in range(50):
        n = int(rng.integers(1, 20))  # 1..19 activated experts
        ids = rng.choice(64, size=n, replace=False)
        # decode (all ones) half of the time; prefill counts otherwise (seed switches rule on it)
        cnt = np.ones(n, int) if rng.random() < 0.5 else rng.integers(1, 300, n)
        cache = FakeCache(rng.choice(64, size=int(rng.integers(0, 40)), replace=False).tolist())
        p = plan(3, ids, cnt, cache, costs, mode, pcie_busy=float(rng.random() * 1e-4))
        p.check(cache)
        assert p.makespan == pytest.approx(max(p.cpu_end, p.gpu_end))
        assert all(p.where(int(e)) in ("gpu", "load", "cpu") for e in ids)


def test_check_rejects_a_broken_plan():
    costs = linear_costs()
    cache = FakeCache([1])
    p = timeline(0, [1], [1], [], {1: 1}, costs)  # expert 1 placed twice
    with pytest.raises(ScheduleError, match="exactly once"):
        p.check(cache)
    p = timeline(0, [], [1], [], {1: 1}, costs)  # loading a resident expert
    with pytest.raises(ScheduleError, match="loads that already are"):
        p.check(cache)


def test_timeline_lanes_hand_computed():
    costs = linear_costs(cpu=(1.0, 0.0), gpu=(0.1, 0.0), transfer=0.5, cpu_ovh=0.2, gpu_ovh=0.05)
    p = timeline(0, [1], [2, 3], [4, 5], {e: 1 for e in range(1, 6)}, costs, pcie_busy=0.1 * MS,
                 with_events=True)
    # PCIe: 0.1 busy, loads end 0.6 and 1.1; GPU: 0.05 + 0.1 = 0.15, e2 0.6..0.7, e3 1.1..1.2
    assert p.pcie_end == pytest.approx(1.1 * MS)
    assert p.gpu_end == pytest.approx(1.2 * MS)
    assert p.cpu_end == pytest.approx(2.2 * MS)  # 0.2 + 1 + 1
    assert p.makespan == pytest.approx(2.2 * MS)
    assert ("pcie", 2, pytest.approx(0.1 * MS), pytest.approx(0.6 * MS)) in p.events


def test_hybrid_beats_kt_static_when_transfers_are_cheap():
    # 4 uncached experts, 1 token each; CPU 1 ms each, transfer 0.2 ms, GPU 0.1 ms
    costs = linear_costs(cpu=(1.0, 0.0), gpu=(0.1, 0.0), transfer=0.2)
    ids, cnt, cache = [0, 1, 2, 3], [1, 1, 1, 1], FakeCache([])
    h = plan(0, ids, cnt, cache, costs, "hybrid")
    k = plan(0, ids, cnt, cache, costs, "kt-static")
    assert k.makespan == pytest.approx(4 * MS)
    assert h.loads and h.makespan < k.makespan


def test_hybrid_beats_gpu_only_when_transfers_are_slow():
    # Mixtral-like: transfer 4 ms, CPU 1.3 ms, GPU 0.2 ms; 1 resident + 2 misses
    costs = linear_costs(cpu=(1.3, 0.0), gpu=(0.2, 0.0), transfer=4.0)
    ids, cnt, cache = [0, 1, 2], [1, 1, 1], FakeCache([0])
    h = plan(0, ids, cnt, cache, costs, "hybrid")
    g = plan(0, ids, cnt, cache, costs, "gpu-only")
    assert g.makespan == pytest.approx(8.2 * MS)
    assert set(h.cpu) == {1, 2} and h.gpu == (0,) and h.makespan == pytest.approx(2.6 * MS)


def test_hybrid_beats_cpu_only_with_resident_experts():
    costs = linear_costs(cpu=(1.0, 0.0), gpu=(0.1, 0.0), transfer=5.0)
    ids, cnt, cache = [0, 1, 2, 3], [1] * 4, FakeCache([0, 1, 2])
    h = plan(0, ids, cnt, cache, costs, "hybrid")
    c = plan(0, ids, cnt, cache, costs, "cpu-only")
    assert c.makespan == pytest.approx(4 * MS)
    assert h.makespan == pytest.approx(1 * MS) and h.gpu == (0, 1, 2) and h.cpu == (3,)


def test_hybrid_beats_seed_when_its_constants_are_wrong():
    # seed's constants say a transfer (0.418) is cheaper than a CPU expert (1.79): it loads the miss.
    # On Mixtral-like real costs the transfer is 4 ms and the CPU does it in 1.3 ms.
    costs = linear_costs(cpu=(1.3, 0.0), gpu=(0.2, 0.0), transfer=4.0)
    ids, cnt, cache = [0, 1], [1, 1], FakeCache([0])
    s = plan(0, ids, cnt, cache, costs, "seed")
    h = plan(0, ids, cnt, cache, costs, "hybrid")
    assert s.loads == (1,) and h.cpu == (1,)
    assert h.makespan < s.makespan / 2


def test_hybrid_prefill_puts_heavy_experts_on_gpu_light_on_cpu():
    # prefill: GPU cost flat in tokens, CPU grows 0.1 ms per token: heavy misses are worth loading
    costs = linear_costs(cpu=(0.5, 0.1), gpu=(0.1, 0.001), transfer=1.0)
    ids, cnt = [0, 1, 2, 3], [200, 150, 2, 1]
    h = plan(0, ids, cnt, FakeCache([]), costs, "hybrid")
    assert set(h.loads) == {0, 1} and set(h.cpu) == {2, 3}
    for base in ("kt-static", "gpu-only", "cpu-only", "seed"):
        assert h.makespan < plan(0, ids, cnt, FakeCache([]), costs, base).makespan, base


def test_seed_prefill_never_uses_cpu():
    costs = linear_costs()
    s = plan(0, [0, 1, 2], [5, 1, 1], FakeCache([1]), costs, "seed")
    assert s.cpu == () and s.gpu == (1,) and set(s.loads) == {0, 2}


def test_prefetched_in_flight_expert_waits_for_arrival():
    costs = linear_costs(cpu=(10.0, 0.0), gpu=(0.1, 0.0), transfer=1.0)
    cache = FakeCache([0])
    p = plan(0, [0], [1], cache, costs, "hybrid", ready={0: 0.7 * MS})
    assert p.gpu_end == pytest.approx(0.8 * MS)


def test_cache_view_and_real_cache_work_with_plan():
    costs = CostModel.paper_a6000("deepseek-v2-lite")
    c = ExpertCache(2, 64, capacity=8, policy="mrs", top_k=6)  # resident 0..7
    ids = [3, 10, 20, 30, 40, 50]
    p = plan(1, ids, [1] * 6, c, costs)
    p.check(c)
    assert 3 in p.gpu
    v = CacheView(c, 1, [10])
    p2 = plan(1, ids, [1] * 6, v, costs)
    p2.check(v)
    assert p2.makespan <= p.makespan


def test_bad_inputs_raise():
    costs = linear_costs()
    with pytest.raises(ScheduleError, match="unknown schedule mode"):
        plan(0, [1], [1], FakeCache([]), costs, "fastest")
    with pytest.raises(ScheduleError, match="distinct"):
        plan(0, [1, 1], [1, 1], FakeCache([]), costs)


@pytest.mark.parametrize("mode", MODES)
def test_makespan_from_counts_equals_plan(mode):
    # scheduler.makespan (the prefetcher's cheap evaluation) sees only token counts split by
    # residency; it must equal the full plan's makespan on the same layer, whatever the ids.
    rng = np.random.default_rng(11)
    costs = [CostModel.paper_a6000(), linear_costs(cpu_ovh=0.03, gpu_ovh=0.01)]
    for trial in range(60):
        n = int(rng.integers(1, 9))
        ids = rng.choice(64, n, replace=False)
        cnt = rng.choice([1, 1, 1, 2, 5, 40, 300], n) if trial % 3 else np.ones(n, np.int64)
        res = set(rng.choice(ids, int(rng.integers(0, n + 1)), replace=False).tolist())
        cm = costs[trial % 2]
        busy = float(rng.uniform(0, 3)) * cm.transfer_time(0) if trial % 4 == 0 else 0.0
        want = plan(0, ids, cnt, FakeCache(res), cm, mode, pcie_busy=busy).makespan
        hits = [int(c) for e, c in zip(ids, cnt) if e in res]
        other = [int(c) for e, c in zip(ids, cnt) if e not in res]
        assert makespan(0, hits, other, cm, mode, pcie_busy=busy) == pytest.approx(want, rel=1e-12), (trial, mode)
