"""Prefetch mode 'pays' (hybrimoe.prefetch): the look-ahead's hit rate measured per target layer
and fed back into each prediction's probability, a prefetch only where p * saved beats the
victim's expected loss and the part of the copy past the idle window, and the runtime (GPU side
emulated, the simulator's predictions injected) choosing the simulator's prefetches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import replay_trace

from hybrimoe.cache import ExpertCache
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.layer import HybridRuntime, RuntimeConfig
from hybrimoe.prefetch import Prediction, PrefetchConfigError, Prefetcher
from hybrimoe.scheduler import makespan
from hybrimoe.sim import DegradedPredictor, simulate
from hybrimoe.step import LayerDecision, PrefetchDecision
from hybrimoe.traces import DECODE, Trace

MS = 1e-3


def _costs(cpu=0.5 * MS, gpu=0.1 * MS, transfer=1.0 * MS, dense=0.05 * MS, nbytes=1000):
    pts = (1, 4, 16, 64, 256)
    lc = LayerCost(pts, tuple(cpu + 1e-5 * n for n in pts), tuple(gpu + 1e-7 * n for n in pts), transfer, nbytes,
                   tuple(dense for _ in pts))
    return CostModel((lc,), "test")


def test_hit_rate_per_layer_is_measured_and_fed_back(rng):
    pf = Prefetcher(_costs(), 2, 3, prefetch_mode="pays", acc_decay=0.9)
    cache = ExpertCache(4, 8, capacity=2, policy="lru")
    h = c = n = 0.0
    for _ in range(12):
        pred = rng.choice(8, 3, replace=False)
        prob = rng.uniform(0.2, 0.9, 3)
        pf.choose(0, {2: Prediction(pred, np.ones(3, np.int64), prob)}, cache, idle_before={})
        act = rng.choice(8, 2, replace=False)
        pf.record(2, act)
        k = 0.9 ** 3
        h, c, n = k * h + len(set(pred) & set(act)), k * c + prob.sum(), k * n + 3
    assert pf.layer_accuracy() == {(2, 2): pytest.approx(h / n)}
    assert pf.calibrated(2, 2, 0.6) == pytest.approx(min(1.0, 0.6 * (h + 1) / (c + 1)))
    assert pf.calibrated(1, 2, 0.6) == 0.6  # unmeasured: the claim
    with pytest.raises(PrefetchConfigError, match="prefetch mode"):
        Prefetcher(_costs(), 2, prefetch_mode="always")


@pytest.mark.parametrize("trial", range(6))
def test_pays_picks_the_best_net_gain_only_when_positive(rng, trial):
    """One pick among random candidates: the chosen one has the largest
        net = p * saved - victim loss - over * (p + r)
    computed here directly (p the claim: nothing measured yet), and none is chosen when every net <= 0."""
    costs = _costs(transfer=rng.uniform(0.2, 3.0) * MS)
    E, cap = 12, 3
    cache = ExpertCache(3, E, capacity=cap, policy="lfu", top_k=2)
    for _ in range(20):  # history: use rates of the residents
        for layer in range(3):
            cache.access(layer, rng.choice(E, 2, replace=False))
    pf = Prefetcher(costs, 1, 3, prefetch_mode="pays")
    r_next = rng.uniform(0, 1)
    for _ in range(30):  # the next layer's demand-load rate: an EMA of a known sequence
        pf.note_loads(1, 1)
    for _ in range(int(r_next * 30)):
        pf.note_loads(1, 0)
    rate = pf._load_rate[1]
    ex = rng.choice(E, 4, replace=False)
    cnt = rng.integers(1, 4, size=4)
    prob = rng.uniform(0.05, 1.0, 4)
    pred = {2: Prediction(ex, cnt, prob)}
    idle = {2: rng.uniform(0.1, 2.0) * MS}
    # direct computation
    protect = {(2, int(e)) for e in ex}
    v = cache._victim(2, protect, demand=False)
    if cache.n_resident(2) < cap:  # a free slot: the prefetch evicts nothing
        loss = 0.0
    elif v is None:  # every resident is predicted (protected): nothing may be evicted, nothing prefetched
        assert pf.choose(0, pred, cache, idle_before=idle) == []
        return
    else:
        loss = cache.freq[v] / cache._seen[2] * (costs.cpu_time(2, 1) - costs.gpu_time(2, 1))
    res = [int(e) for e in ex if cache.contains(2, int(e))]
    hit_c = [int(n) for e, n in zip(ex, cnt) if cache.contains(2, int(e))]
    rest_c = [int(n) for e, n in zip(ex, cnt) if not cache.contains(2, int(e))]
    base = makespan(2, hit_c, rest_c, costs, "hybrid")
    tr = costs.transfer_time(2)
    over = max(0.0, tr - idle[2])
    nets = {}
    for e, n, p in zip(ex.tolist(), cnt.tolist(), prob.tolist()):
        if e in res:
            continue
        r = list(rest_c)
        r.remove(n)
        saved = base - makespan(2, hit_c + [n], r, costs, "hybrid")
        nets[e] = p * saved - loss - over * (p + rate)
    orders = pf.choose(0, pred, cache, idle_before=idle)
    best = max(nets.values())
    if best > 0:
        assert len(orders) == 1 and orders[0].gain == pytest.approx(best)
        assert nets[orders[0].expert] == pytest.approx(best)
    else:
        assert orders == []


def test_runtime_prefetches_as_the_simulator(tiny, tmp_path, rng):
    """The runtime with mode 'pays' and the simulator, fed the same (degraded, seeded) predictions:
    the same layer decisions and prefetches at every step. Transfers cost ~nothing, so neither's
    idle budget binds (they measure it differently)."""
    m, store = tiny
    L, E, k = len(store.layers), m.config.n_experts, m.config.top_k
    n = 30
    nbytes = store.layout(store.layers[0]).nbytes
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, policy="lru", prefetch_size=2, prefetch_mode="pays",
                                            emulate_gpu=True, device="cpu", costs="paper-a6000",
                                            cache_dir=str(tmp_path), record_decisions=True))
    assert rt.engine == "python" and rt.prefetcher.prefetch_mode == "pays"
    costs = _costs(cpu=1e-3, transfer=1e-9, nbytes=nbytes)
    rt.set_costs(costs)
    from hybrimoe.prefetch import Prefetcher as P

    # a random routing whose simulation prefetches at least once (some draws never pay, and a
    # comparison without prefetches would check nothing of them): redraw until one does
    for _ in range(50):
        ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(n)])
        sc = np.sort(rng.dirichlet(np.ones(k), size=(n, L)), -1)[..., ::-1].astype(np.float32)
        tr = Trace(ids.astype(np.int16), sc.copy(), np.full(n, DECODE, np.uint8), np.zeros(n, np.int32),
                   np.arange(L, dtype=np.int16), E, "random")
        seed = int(rng.integers(1 << 30))
        sim_cache = copy.deepcopy(rt.cache)
        pf = P(costs, 2, 3, "hybrid", prefetch_mode="pays")
        res = simulate(tr, sim_cache, costs, "hybrid", pf, DegradedPredictor(tr, 0.6, seed), log=True)
        sim = []
        for r in res.layer_log:
            sim.append(("d", r["decision"].key()))
            sim += [("p", p.order.layer, p.order.expert, p.slot, p.evicted) for p in r["prefetches"]]
        if any(x[0] == "p" for x in sim):
            break
    rt_pred = DegradedPredictor(tr, 0.6, seed)
    calls = [0]

    def predictions(i, la_np):
        t = calls[0] // L
        calls[0] += 1
        return rt_pred.predict(np.array([t]), i, rt.prefetcher.horizon)

    rt.lookahead.ids = lambda i, x: torch.zeros(x.shape[0], 1)
    rt._predictions = predictions
    for _ in replay_trace(rt, store, tr, m.config.hidden):
        pass
    got = [("d", d.key()) if isinstance(d, LayerDecision) else ("p", d.order.layer, d.order.expert, d.slot, d.evicted)
           for _, d in rt.decisions if isinstance(d, (LayerDecision, PrefetchDecision))]
    assert len(got) == len(sim)
    for j, (a, b) in enumerate(zip(got, sim)):
        assert a == b, f"item {j}: runtime {a} != simulator {b}"
    assert sum(1 for x in sim if x[0] == "p") > 0
    assert rt.cache.stats() == sim_cache.stats()
    assert rt.prefetcher.layer_accuracy() == pytest.approx(pf.layer_accuracy())
    # the fed-back probabilities are below the predictor's claim (1.0): it is right ~60% of the time
    assert all(v < 0.9 for v in pf.layer_accuracy().values())


def test_native_engine_refuses_pays(tiny, tmp_path):
    from hybrimoe import engine
    from hybrimoe.errors import HybrimoeError

    if not engine.available():
        pytest.skip("hybrimoe._cpu (with the engine) is not built")
    m, store = tiny
    with pytest.raises(HybrimoeError, match="pays"):
        HybridRuntime(store, RuntimeConfig(cache_size=2, prefetch_size=2, prefetch_mode="pays", engine="native",
                                           emulate_gpu=True, device="cpu", costs="paper-a6000",
                                           cache_dir=str(tmp_path)))
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, prefetch_size=2, prefetch_mode="impact", engine="auto",
                                            emulate_gpu=True, device="cpu", costs="paper-a6000",
                                            cache_dir=str(tmp_path)))
    assert rt.engine == "native"
