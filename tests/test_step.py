"""hybrimoe.step: one decision sequence for runtime and simulator.

The same routing replayed through HybridRuntime (GPU side emulated on the host) and through
hybrimoe.sim.simulate must give the same decisions at every (step, layer): hits, the scheduler's
plan, the slots taken, the loads the cache refused (run on the CPU by both), the evictions."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from hybrimoe.cache import ExpertCache
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.layer import HybridRuntime, RuntimeConfig
from hybrimoe.scheduler import MODES, timeline
from hybrimoe.sim import simulate
from hybrimoe.step import decide, release
from hybrimoe.traces import DECODE, PREFILL, Trace
from conftest import replay_trace


def _costs(nbytes, cpu_per_tok=1e-4, gpu=2e-5, transfer=1e-4):
    """Hand-given costs where hybrid mixes hits, loads and CPU experts."""
    pts = (1, 4, 16, 64, 256)
    lc = LayerCost(pts, tuple(cpu_per_tok * n + 1e-4 for n in pts), tuple(gpu + 1e-7 * n for n in pts),
                   transfer, nbytes)
    return CostModel((lc,), "test")


def _trace(rng, n_layers, E, k, n_decode=24, n_prefill=0) -> Trace:
    n = n_prefill + n_decode
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(n_layers)]) for _ in range(n)])
    sc = rng.dirichlet(np.ones(E), size=(n, n_layers))
    sc = np.take_along_axis(sc, ids, -1).astype(np.float32)
    phase = np.array([PREFILL] * n_prefill + [DECODE] * n_decode, np.uint8)
    return Trace(ids.astype(np.int16), sc, phase, np.zeros(n, np.int32), np.arange(n_layers, dtype=np.int16), E,
                 "random")


def _keys(decisions):
    return [d.key() for d in decisions]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy,cache", [("mrs", 3), ("lru", 1), ("lfu", 2), ("static", 3), ("lru", "budget")])
@pytest.mark.parametrize("engine", ["python", "auto"])
def test_runtime_and_simulator_decide_alike(tiny, tmp_path, rng, mode, policy, cache, engine):
    m, store = tiny
    L, E, k = len(store.layers), m.config.n_experts, m.config.top_k
    tr = _trace(rng, L, E, k)
    nbytes = store.layout(store.layers[0]).nbytes
    size = dict(gpu_budget=5 * nbytes) if cache == "budget" else dict(cache_size=cache)
    static = tr.counts() if policy == "static" else None
    rt = HybridRuntime(store, RuntimeConfig(policy=policy, schedule=mode, emulate_gpu=True, device="cpu",
                                            costs="paper-a6000", cache_dir=str(tmp_path), static_counts=static,
                                            record_decisions=True, engine=engine, **size))
    from hybrimoe import engine as native

    assert rt.engine == ("native" if engine == "auto" and native.available() else "python")
    costs = _costs(nbytes)
    rt.set_costs(costs)
    # the same starting residents and slots (a native runtime's cache started from a Python one)
    sim_cache = copy.deepcopy(getattr(rt.cache, "origin", rt.cache))
    # runtime: one token per step, every MoE layer in order, routing taken from the trace
    for _ in replay_trace(rt, store, tr, m.config.hidden):
        pass
    res = simulate(tr, sim_cache, costs, mode, log=True)
    sim_d = [r["decision"] for r in res.layer_log]
    rt_d = [d for _, d in rt.decisions]
    assert len(rt_d) == len(sim_d) == tr.n_tokens * L
    for n, (a, b) in enumerate(zip(rt_d, sim_d)):
        assert a.key() == b.key(), f"step {n // L} layer {n % L}: runtime {a.key()} != simulator {b.key()}"
    assert rt.cache.stats() == sim_cache.stats()
    for j in range(L):
        assert rt.cache.resident(j) == sim_cache.resident(j)
    # what the runtime computed is what was decided: refused loads ran on the CPU
    s = rt.summary()
    assert s["experts_cpu"] == sum(len(d.plan.cpu) for d in rt_d)
    assert s["demand_loads"] == sum(len(d.loads) for d in rt_d)
    assert sum(rt.stats[layer].refused for layer in store.layers) == sum(len(d.refused) for d in rt_d)
    if policy == "lru" and cache == 1 and mode == "gpu-only":  # top-2 into one slot: refusals must occur
        assert any(d.refused for d in rt_d)


def test_refused_load_runs_on_the_cpu_and_is_timed_there():
    # 16 experts, top-6, 3 slots, gpu-only: the case. 3 hits pinned, nothing may go.
    cache = ExpertCache(1, 16, capacity=3, policy="lru", top_k=6)  # warm: experts 0, 1, 2
    costs = _costs(1000)
    experts, counts = np.array([0, 1, 2, 5, 7, 9]), np.ones(6, np.int64)
    d = decide(cache, costs, "gpu-only", 0, experts, counts)
    assert d.planned.loads == (5, 7, 9) and d.planned.cpu == ()
    assert d.refused == (5, 7, 9) and d.loads == () and d.plan.loads == ()
    assert d.plan.cpu == (5, 7, 9) and set(d.slots) == {0, 1, 2}
    want = timeline(0, (0, 1, 2), (), (5, 7, 9), dict(zip(experts.tolist(), counts.tolist())), costs)
    assert d.plan.makespan == want.makespan and d.plan.cpu_end > 0 and d.plan.pcie_end == 0.0
    release(cache, 0)
    # unpinned, the next step's loads may evict: one slot taken by 5 evicts the least recent
    d2 = decide(cache, costs, "gpu-only", 0, np.array([5]), np.ones(1, np.int64))
    assert d2.refused == () and d2.loads[0][0] == 5 and d2.evicted == ((0, 0),)


def test_simulator_times_refused_loads_on_the_cpu(rng):
    # before the shared sequence, the simulator timed a refused load as a GPU load
    tr = _trace(rng, 2, 16, 6, n_decode=12)
    costs = _costs(1000, cpu_per_tok=1e-3)
    cache = ExpertCache(2, 16, capacity=3, policy="lru", top_k=6)
    res = simulate(tr, cache, costs, "gpu-only", log=True)
    ds = [r["decision"] for r in res.layer_log]
    assert sum(len(d.refused) for d in ds) > 0
    for d in ds:
        assert set(d.plan.cpu) == set(d.refused) and len(d.plan.loads) + len(d.refused) == len(d.planned.loads)
        assert d.plan.makespan == pytest.approx(max(d.plan.cpu_end, d.plan.gpu_end))
    assert res.total_s == pytest.approx(sum(costs.dense_time(r["layer"], 1) for r in res.layer_log)
                                        + sum(d.plan.makespan for d in ds))


def test_decision_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import hybrimoe.step, hybrimoe.cache, hybrimoe.costs, hybrimoe.scheduler, hybrimoe.prefetch\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers')]\n"
            "assert not [m for m in bad if sys.modules[m] is not None], bad\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
