"""Simulator and bounds: Belady MIN is optimal (brute force) and beats every demand policy on real
traces; the lower bound is below every simulated time; prefetch with an oracle pays off."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from hybrimoe.cache import POLICIES
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.prefetch import Prefetcher
from hybrimoe.sim import (DegradedPredictor, LearnedPredictor, OraclePredictor, belady_hits, lower_bound, main,
                          make_cache, min_hit_rate, run_one, simulate)
from hybrimoe.traces import DECODE, Trace, load_trace

MS = 1e-3
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
FLAME = TRACES / "flame-moe-290m_dynande" / "flame290m_prefill_4x512tok_8layers_top6.npz"
MIXTRAL = TRACES / "mixtral8x7b_speculative-moe" / "humaneval_2_routing.jsonl"
need = pytest.mark.skipif(not (FLAME.is_file() and MIXTRAL.is_file()), reason=f"traces not found under {TRACES}")


def brute_force_best_hits(reqs, cap, E):
    """Max hits over every bypass-allowed cache schedule with a free initial set (tiny inputs)."""
    best = {frozenset(s): 0 for s in itertools.combinations(range(E), cap)}
    for r in reqs:
        nxt = {}
        for s, h in best.items():
            hit = r in s
            outs = [s] if hit else [s] + [frozenset(s - {v} | {r}) for v in s]
            for o in outs:
                nxt[o] = max(nxt.get(o, -1), h + hit)
        best = nxt
    return max(best.values())


def test_belady_hand_example_and_brute_force(rng):
    # initial {0, 1}; 2 is never used again -> bypass; 4 hits of 5
    assert belady_hits([[0], [1], [2], [0], [1]], 2) == (4, 5)
    for _ in range(30):
        E, cap = 5, int(rng.integers(1, 4))
        reqs = [int(x) for x in rng.integers(0, E, 12)]
        h, n = belady_hits([[r] for r in reqs], cap)
        assert n == 12 and h == brute_force_best_hits(reqs, cap, E)


def synth_trace(rng, n=60, L=4, E=8, k=2) -> Trace:
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(n)])
    sc = rng.dirichlet(np.ones(k), size=(n, L)).astype(np.float32)
    return Trace(ids.astype(np.int16), np.sort(sc, -1)[..., ::-1].copy(), np.full(n, DECODE, np.uint8),
                 np.zeros(n, np.int32), np.arange(L, dtype=np.int16), E, "synth")


@need
@pytest.mark.parametrize("path,n,cap", [(FLAME, 96, 16), (FLAME, 96, 32), (MIXTRAL, 40, 4)])
def test_min_beats_every_demand_policy_and_lower_bound_holds(path, n, cap):
    tr = load_trace(path).subset(slice(0, n))
    costs = CostModel.paper_a6000("mixtral" if tr.n_experts == 8 else "deepseek-v2-lite")
    h, tot = min_hit_rate(tr, cap)
    lb = lower_bound(tr, costs, cap)
    for pol in ("mrs", "lru", "lfu", "static"):
        for mode in ("hybrid", "gpu-only", "kt-static", "seed"):
            r = run_one(tr, costs, pol, cap, mode, 0)
            assert r.stats["hits"] + r.stats["misses"] == tot
            assert r.stats["hits"] <= h, (pol, mode)
            assert lb <= r.total_s * (1 + 1e-9), (pol, mode)
        r = run_one(tr, costs, pol, cap, "hybrid", 2, "oracle")  # prefetching: still above the bound
        assert lb <= r.total_s * (1 + 1e-9)


def test_lower_bound_holds_on_synthetic_runs(rng):
    tr = synth_trace(rng)
    costs = CostModel.paper_a6000("mixtral")
    lb = lower_bound(tr, costs, 2)
    for pol in ("mrs", "lru", "lfu"):
        for mode in ("hybrid", "gpu-only", "cpu-only", "kt-static", "seed"):
            for pf in (0, 2):
                assert lb <= run_one(tr, costs, pol, 2, mode, pf, "oracle").total_s * (1 + 1e-9)


def test_oracle_prefetch_pays_off_when_the_link_is_idle(rng):
    # long dense phases (2 ms) leave the link idle; a transfer (0.3 ms) beats the CPU (1 ms)
    lc = LayerCost((1, 2), (1 * MS, 1 * MS), (0.1 * MS, 0.1 * MS), 0.3 * MS, 1000, (2 * MS, 2 * MS))
    costs = CostModel((lc,), "idle-link")
    tr = synth_trace(rng, n=40, L=4, E=8, k=1)
    base = run_one(tr, costs, "lru", 2, "hybrid", 0)
    pref = run_one(tr, costs, "lru", 2, "hybrid", 2, "oracle")
    assert pref.stats["hit_rate"] > base.stats["hit_rate"] + 0.3
    assert pref.total_s < base.total_s
    assert pref.accuracy[1] == 1.0


def test_predictors(rng):
    tr = synth_trace(rng, n=50)
    tok = np.array([7])
    o = OraclePredictor(tr).predict(tok, 0, 3)
    assert sorted(o) == [1, 2, 3] and set(o[1].experts) == set(tr.expert_ids[7, 1].tolist())
    d = DegradedPredictor(tr, 0.0).predict(tok, 0, 1)
    assert not set(d[1].experts) & set(tr.expert_ids[7, 1].tolist())  # accuracy 0: all swapped
    lp = LearnedPredictor(tr, 3)
    assert lp.predict(tok, 0, 3) == {}  # nothing learned yet
    for t in range(50):
        lp.update(np.array([t]))
    p = lp.predict(tok, 0, 3)
    assert sorted(p) == [1, 2, 3] and all(len(x.experts) == tr.top_k for x in p.values())
    assert all(0 < x <= 1 for x in p[1].prob)


def test_same_objects_as_the_runtime_are_driven(rng):
    tr = synth_trace(rng, n=20)
    costs = CostModel.paper_a6000("mixtral")
    cache = make_cache(tr, "mrs", 3)
    pf = Prefetcher(costs, 1)
    res = simulate(tr, cache, costs, "hybrid", pf, OraclePredictor(tr))
    assert {k: v for k, v in res.stats.items() if k != "hits_in_flight"} == cache.stats()
    assert res.n_tokens == 20 and 0 <= res.stats["hits_in_flight"] <= res.stats["prefetch_used"]
    assert cache.stats()["hits"] + cache.stats()["misses"] == sum(
        len(np.unique(tr.expert_ids[t, layer])) for t in range(20) for layer in range(tr.n_layers))


@need
def test_cli_single_run_and_sweep(tmp_path, capsys):
    assert main(["--trace", str(MIXTRAL), "--cache-size", "4", "--policy", "lru", "--prefetch-size", "2",
                 "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    d = json.loads(out[out.index("{"):])
    assert d["hits"] / (d["hits"] + d["misses"]) <= 1 and d["lb_ms_per_token"] <= d["ms_per_token"]
    js = tmp_path / "sweep.json"
    assert main(["--trace", str(MIXTRAL), "--sweep", "--max-tokens", "10", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == len(POLICIES) * 3 * 2


@pytest.mark.parametrize("args,msg", [
    (["--prefetch-size", "-3"], "--prefetch-size must be >= 0, found -3"),
    (["--cache-size", "-1"], "--cache-size must be >= 0, found -1"),
    (["--chunk", "0"], "--chunk must be >= 1, found 0"),
    (["--max-tokens", "-4"], "--max-tokens must be >= 0, found -4"),
    (["--prefetch-size", "9"], "--prefetch-size must be in 0..8 (the trace's experts per layer), found 9"),
    (["--cache-size", "9"], "--cache-size must be in 0..8 (the trace's experts per layer), found 9"),
    (["--predictor", "degraded:1.5"], "--predictor degraded:ACC needs ACC in 0..1, found '1.5'"),
    (["--predictor", "psychic"], "--predictor must be oracle, learned or degraded:ACC, found 'psychic'"),
])
def test_sim_numeric_flags_are_range_checked(args, msg, capsys):
    """Every numeric flag of `python -m hybrimoe.sim` out of range: exit 2 and one line naming it
    (the E-bounded ones once the trace, 8 experts per layer, is read)."""
    if not MIXTRAL.is_file():
        pytest.skip(f"trace not found at {MIXTRAL} (shared/ is not next to the repo)")
    assert main(["--trace", str(MIXTRAL), "--max-tokens", "4", *args]) == 2
    assert capsys.readouterr().err.strip() == f"error: {msg}"
