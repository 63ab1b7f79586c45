"""Prefetcher: picks by simulated gain, respects the idle window and size, never delays demand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from hybrimoe.cache import ExpertCache
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.prefetch import Prediction, Prefetcher, idle_budget
from hybrimoe.scheduler import CacheView, plan
from hybrimoe.sim import OraclePredictor, simulate
from hybrimoe.traces import load_trace

MS = 1e-3
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
FLAME = TRACES / "flame-moe-290m_dynande" / "flame290m_prefill_4x512tok_8layers_top6.npz"


def prefill_costs() -> CostModel:
    # CPU: 0.5 ms + 0.1 ms/token; GPU: 0.1 ms + 0.001 ms/token; transfer 1 ms
    lc = LayerCost((1, 1001), (0.5 * MS, 100.5 * MS), (0.1 * MS, 1.1 * MS), 1.0 * MS, 1000, (0.2 * MS, 0.2 * MS))
    return CostModel((lc,), "test")


def test_picks_the_highest_simulated_gain_first():
    costs = prefill_costs()
    cache = ExpertCache(4, 16, capacity=4, policy="lru")  # resident 0..3 in every layer
    pred = {1: Prediction(np.array([5, 6, 7]), np.array([200, 2, 60]), np.ones(3))}
    pf = Prefetcher(costs, prefetch_size=1)
    orders = pf.choose(0, pred, cache, idle_before={1: 10 * MS})
    assert [(o.layer, o.expert) for o in orders] == [(1, 5)]
    base = plan(1, pred[1].experts, pred[1].counts, cache, costs).makespan
    gains = {e: base - plan(1, pred[1].experts, pred[1].counts, CacheView(cache, 1, [e]), costs).makespan
             for e in (5, 6, 7)}
    assert max(gains, key=gains.get) == 5
    assert orders[0].gain == pytest.approx(gains[5])
    # two picks: gains in non-increasing order, the second marginal to the first
    orders = Prefetcher(costs, prefetch_size=2).choose(0, pred, cache, idle_before={1: 10 * MS})
    assert len(orders) == 2 and orders[0].gain >= orders[1].gain > 0


def test_gain_is_weighted_by_prediction_probability():
    costs = prefill_costs()
    cache = ExpertCache(4, 16, capacity=4, policy="lru")
    pred = {1: Prediction(np.array([5, 6]), np.array([100, 100]), np.array([0.2, 0.9])),
            2: Prediction(np.array([8]), np.array([100]), np.array([0.5]))}
    orders = Prefetcher(costs, prefetch_size=1).choose(0, pred, cache, idle_before={1: 9 * MS, 2: 9 * MS})
    assert [(o.layer, o.expert) for o in orders] == [(1, 6)]


def test_off_too_little_idle_time_and_resident_experts():
    costs = prefill_costs()
    cache = ExpertCache(4, 16, capacity=4, policy="lru")
    pred = {1: Prediction(np.array([2, 5, 6]), np.array([100, 100, 100]), np.ones(3))}
    assert Prefetcher(costs, prefetch_size=0).choose(0, pred, cache, idle_before={1: 9 * MS}) == []
    assert Prefetcher(costs, prefetch_size=2).choose(0, pred, cache, idle_before={1: 0.9 * MS}) == []
    # room for one 1 ms transfer only
    orders = Prefetcher(costs, prefetch_size=2).choose(0, pred, cache, idle_before={1: 1.5 * MS})
    assert len(orders) == 1 and orders[0].expert in (5, 6)  # 2 is resident: never a candidate


def test_idle_budget_whole_copies_vs_preemptive():
    kw = dict(moe_makespan=2.0, pcie_end=0.5, next_dense=0.5, backlog=1.0, horizon=3, n_layers=6)
    # whole-expert DMA: everything must end before layer 4's demand loads: w - backlog = 2 - 1
    assert idle_budget(3, **kw) == {4: 1.0, 5: 1.0}
    # preemptive: layer 3+d may use d windows; layer 6 does not exist
    assert idle_budget(3, spans_layers=True, **kw) == {4: 1.0, 5: 3.0}


def test_accuracy_tracking():
    pf = Prefetcher(prefill_costs(), prefetch_size=0, horizon=2)
    cache = ExpertCache(4, 16, capacity=4, policy="lru")
    pf.choose(0, {1: Prediction.certain([5, 6]), 2: Prediction.certain([7, 8])}, cache, idle_before={})
    pf.record(1, np.array([5, 9]))
    pf.record(2, np.array([7, 8]))
    assert pf.accuracy() == {1: 0.5, 2: 1.0}


@pytest.mark.skipif(not FLAME.is_file(), reason=f"trace not found at {FLAME}")
@pytest.mark.parametrize("pcie", ["whole", "preemptive"])
def test_prefetch_never_delays_a_demand_load(pcie):
    tr = load_trace(FLAME).subset(slice(0, 96))
    costs = CostModel.paper_a6000("deepseek-v2-lite")
    cache = ExpertCache(tr.n_layers, tr.n_experts, capacity=16, policy="mrs", top_k=tr.top_k)
    res = simulate(tr, cache, costs, "hybrid", Prefetcher(costs, 2), OraclePredictor(tr), log=True, pcie=pcie)
    loads = queued = 0
    for row in res.layer_log:
        pl = row["plan"]
        # no layer ever starts with the link still busy with a prefetch it did not ask for
        assert row["head_block"] == pytest.approx(0.0, abs=1e-12)
        assert row["pcie_busy"] == 0 or row["promoted"]
        if pl.loads:
            # demand transfers start right after this layer's own promoted prefetches
            pcie_ev = [ev for ev in pl.events if ev[0] == "pcie"]
            assert pcie_ev[0][2] == pytest.approx(row["pcie_busy"])
            loads += 1
            queued += row["backlog"] > 0
    assert loads > 0 and res.stats["prefetch_used"] > 0, "no demand loads or no prefetch: the test proves nothing"
    if pcie == "preemptive":
        assert queued > 0, "no demand load ran while a prefetch was queued: the test proves nothing"


def test_whole_copy_prefetch_would_block_without_the_budget(monkeypatch):
    # control for the test above: with a budget that ignores the window, a started prefetch
    # is still running when the next layer starts, and the simulator reports it as head_block
    import hybrimoe.sim as sim

    monkeypatch.setattr(sim, "idle_budget", lambda layer, *a, **k: {layer + d: 1.0 for d in (1, 2, 3)})
    tr = load_trace(FLAME).subset(slice(0, 48)) if FLAME.is_file() else pytest.skip("no trace")
    costs = CostModel.paper_a6000("deepseek-v2-lite")
    cache = ExpertCache(tr.n_layers, tr.n_experts, capacity=16, policy="mrs", top_k=tr.top_k)
    res = simulate(tr, cache, costs, "hybrid", Prefetcher(costs, 2), OraclePredictor(tr), log=True)
    assert max(r["head_block"] for r in res.layer_log) > 0


def _choose_brute_force(pf: Prefetcher, layer, preds, cache, idle_before):
    """The prefetcher's rule written plainly: every round re-plans every candidate from scratch."""
    chosen: dict[int, list[int]] = {}
    used, out = 0.0, []
    cands = [(tl, int(e), float(pr)) for tl, p in preds.items() for e, pr in zip(p.experts, p.prob)
             if pr > 0 and idle_before.get(tl, 0.0) >= pf.costs.transfer_time(tl)
             and not cache.contains(tl, int(e)) and cache.can_admit(tl, int(e), protect=p.experts)]
    while cands and len(out) < pf.prefetch_size:
        scored = []
        for tl, e, pr in cands:
            p = preds[tl]
            base = plan(tl, p.experts, p.counts, CacheView(cache, tl, chosen.get(tl, [])), pf.costs, pf.mode).makespan
            with_e = plan(tl, p.experts, p.counts, CacheView(cache, tl, chosen.get(tl, []) + [e]), pf.costs,
                          pf.mode).makespan
            scored.append((pr * (base - with_e), tl, e, pr))
        g, tl, e, pr = max(scored, key=lambda s: s[0])  # first of equal gains, like choose()
        if g <= pf.min_gain:
            break
        cands.remove((tl, e, pr))
        if used + pf.costs.transfer_time(tl) > idle_before.get(tl, 0.0):
            continue
        used += pf.costs.transfer_time(tl)
        chosen.setdefault(tl, []).append(e)
        out.append((tl, e, g))
    return out


@pytest.mark.parametrize("mode", ["hybrid", "gpu-only", "seed"])
def test_choose_equals_brute_force_replanning(mode):
    """choose() re-plans only what a pick changes and shares plans between equal token counts;
    its picks and gains must equal re-planning everything every round."""
    rng = np.random.default_rng(7)
    costs = CostModel.paper_a6000()
    lc = costs.layers[0]
    slower_cpu = CostModel((dataclasses.replace(lc, cpu_s=tuple(3 * t for t in lc.cpu_s)),), "3x cpu")
    for trial in range(40):
        cache = ExpertCache(5, 16, capacity=int(rng.integers(1, 8)), policy="lru")
        preds = {}
        for tl in range(1, 4):
            n = int(rng.integers(2, 7))
            e = np.sort(rng.choice(16, n, replace=False))
            counts = rng.choice([1, 1, 2, 3, 40, 200], n) if trial % 2 else np.ones(n, np.int64)
            preds[tl] = Prediction(e, counts, rng.choice([0.25, 0.5, 1.0], n))
        idle = {tl: float(rng.uniform(0, 5)) * costs.transfer_time(tl) for tl in preds}
        pf = Prefetcher(costs, prefetch_size=int(rng.integers(1, 6)), mode=mode)
        # twice: the second call reads the makespan memo the first filled; then under another cost
        # model, which must not read what the first one left there
        for cm in (costs, costs, slower_cpu):
            pf.costs = cm
            got = [(o.layer, o.expert, o.gain) for o in pf.choose(0, preds, cache, idle_before=idle)]
            want = _choose_brute_force(pf, 0, preds, cache, idle)
            assert [g[:2] for g in got] == [w[:2] for w in want], (trial, got, want)
            assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-12, abs=1e-15)
