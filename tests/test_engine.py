"""The native decision engine (kernels/cpu/engine.cpp via hybrimoe.engine.NativeCache) against its
readable twin (hybrimoe.cache.ExpertCache + hybrimoe.step.decide + hybrimoe.scheduler.plan).

Both are driven with the same routing, random and replayed from real traces, through every cache
policy, every schedule mode, per-layer and byte-budget pools, prefetch on and off, single tokens
and prefill chunks; every decision must be identical at every step: hits, the scheduler's plan
and its times, slots, loads, refusals, evictions, prefetches, then statistics, residents, MRS
scores and access counts."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from hybrimoe import engine
from hybrimoe.cache import ExpertCache
from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.prefetch import Prediction, Prefetcher
from hybrimoe.scheduler import MODES
from hybrimoe.step import decide, fill, prefetch, release
from hybrimoe.traces import load_trace

pytestmark = pytest.mark.skipif(not engine.available(), reason="hybrimoe._cpu (with the engine) is not built")

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
FLAME = TRACES / "flame-moe-290m_dynande" / "flame290m_prefill_4x512tok_8layers_top6.npz"
MIXTRAL = TRACES / "mixtral8x7b_speculative-moe" / "humaneval_2_routing.jsonl"


def _costs(n_layers=1, transfer=1e-4, seed=0):
    """Costs where hybrid mixes hits, loads and CPU experts; per-layer costs differ slightly."""
    r = np.random.default_rng(seed)
    pts = (1, 4, 16, 64, 256)
    layers = []
    for _ in range(n_layers):
        c = r.uniform(0.8, 1.2)
        layers.append(LayerCost(pts, tuple(c * (1e-4 * n + 1e-4) for n in pts), tuple(2e-5 + 1e-7 * n for n in pts),
                                transfer * c, 1000, cpu_layer_overhead=2e-5, gpu_layer_overhead=1e-5))
    return CostModel(tuple(layers), "test")


def _routing(rng, n_steps, L, E, k, chunk_every=0):
    """Per step: per layer (ids (T, k), scores (T, E) full softmax rows); every chunk_every-th
    step is a prefill chunk of 5 tokens."""
    out = []
    for s in range(n_steps):
        T = 5 if chunk_every and s % chunk_every == 0 else 1
        layers = []
        for _ in range(L):
            logits = rng.normal(size=(T, E)) * 2
            p = np.exp(logits - logits.max(1, keepdims=True))
            p = (p / p.sum(1, keepdims=True)).astype(np.float32)
            ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
            layers.append((ids, p))
        out.append(layers)
    return out


def _trace_routing(tr, n_steps):
    out = []
    for t in range(n_steps):
        out.append([(tr.expert_ids[t, j][None].astype(np.int64), tr.score_matrix(slice(t, t + 1), j))
                    for j in range(tr.n_layers)])
    return out


def _drive(cache, costs, mode, routing, pf, horizon, with_scores):
    """Every step and layer through the shared sequence; returns the decisions as plain values."""
    log = []
    L = len(routing[0])
    for s, layers in enumerate(routing):
        for j, (ids, sc) in enumerate(layers):
            e, c = np.unique(ids, return_counts=True)
            d = decide(cache, costs, mode, j, e, c, sc if with_scores else None, prefetcher=pf)
            log.append(("d", s, j, d.key(), d.planned.makespan, d.plan.makespan, d.plan.pcie_end, d.plan.cpu_end))
            if pf is not None:
                preds = {}
                for t in range(j + 1, min(j + 1 + horizon, L)):
                    pe, pc = np.unique(layers[t][0], return_counts=True)
                    preds[t] = Prediction(pe, pc, np.full(len(pe), 0.8))
                idle = {t: 1.0 for t in preds}  # a free link: the choice and the cache decide
                for pd in prefetch(cache, pf, j, preds, idle_before=idle):
                    log.append(("p", s, j, pd.order.layer, pd.order.expert, pd.order.gain, pd.slot, pd.evicted))
            # admission policies: fills of CPU-run experts in an idle window of two transfers (step.fill
            # drives the cache's reuse_score / wants_fill / admit(fill=True) on either side)
            for fd in fill(cache, costs, d, idle_s=2.0 * costs.transfer_time(j)):
                log.append(("f", s, j) + fd.key())
            release(cache, j)
    return log


def _compare(py_cache, nat_cache, costs, mode, routing, prefetch_size=0, with_scores=True):
    L = py_cache.n_layers
    pf_a = Prefetcher(costs, prefetch_size, 3, mode) if prefetch_size else None
    pf_b = Prefetcher(costs, prefetch_size, 3, mode) if prefetch_size else None
    a = _drive(py_cache, costs, mode, routing, pf_a, 3, with_scores)
    b = _drive(nat_cache, costs, mode, routing, pf_b, 3, with_scores)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == y, f"python {x}\n  != native {y}"
    assert py_cache.stats() == nat_cache.stats()
    for j in range(L):
        assert py_cache.resident(j) == nat_cache.resident(j)
    np.testing.assert_array_equal(py_cache.scores, nat_cache.scores)  # bit-identical MRS scores
    np.testing.assert_array_equal(py_cache.freq, nat_cache.freq)
    np.testing.assert_array_equal(py_cache.wfreq, nat_cache.wfreq) if py_cache.policy == "bypass" else None
    np.testing.assert_array_equal(py_cache.prefetch_used_by_layer, nat_cache.prefetch_used_by_layer)
    np.testing.assert_array_equal(py_cache.prefetch_wasted_by_layer, nat_cache.prefetch_wasted_by_layer)
    return a


def _pair(cache, costs):
    return cache, engine.NativeCache.from_cache(copy.deepcopy(cache), costs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["mrs", "lru", "lfu", "static", "bypass", "bypass-gated"])
@pytest.mark.parametrize("pool", ["layer", "budget"])
@pytest.mark.parametrize("prefetch_size", [0, 2])
def test_random_routing_same_decisions(rng, mode, policy, pool, prefetch_size):
    L, E, k = 4, 16, 4
    routing = _routing(rng, 30, L, E, k, chunk_every=7)
    costs = _costs(L, seed=int(rng.integers(1 << 30)))
    static = rng.integers(0, 50, size=(L, E)).astype(float) if policy == "static" else None
    size = dict(byte_budget=10 * 1000, expert_bytes=1000) if pool == "budget" else dict(capacity=[3, 5, 2, 4])
    kw = dict(policy="bypass", gate_demand=True) if policy == "bypass-gated" else dict(policy=policy)
    py, nat = _pair(ExpertCache(L, E, top_k=k, static_counts=static, **kw, **size), costs)
    log = _compare(py, nat, costs, mode, routing, prefetch_size)
    if mode == "hybrid":  # the comparison covered real work: loads and CPU experts both happened
        keys = [x[3] for x in log if x[0] == "d"]
        assert any(key[5][2] for key in keys) and (policy == "static" or any(key[7] for key in keys))
    if policy.startswith("bypass") and mode in ("hybrid", "kt-static"):  # fills were among the decisions
        assert any(x[0] == "f" for x in log) and py.fills > 0
    if policy == "bypass-gated" and mode == "gpu-only":  # the demand gate declined loads on both sides
        assert py.declined > 0 and nat.declined == py.declined


@pytest.mark.parametrize("path,cap,mode", [(FLAME, 16, "hybrid"), (FLAME, 8, "gpu-only"), (FLAME, 16, "seed"),
                                           (MIXTRAL, 4, "hybrid"), (MIXTRAL, 2, "kt-static")])
@pytest.mark.parametrize("policy", ["mrs", "lru", "lfu", "bypass"])
def test_trace_replay_same_decisions(path, cap, mode, policy):
    if not path.is_file():
        pytest.skip(f"trace not found under {TRACES}")
    tr = load_trace(path)
    costs = CostModel.paper_a6000("mixtral" if tr.n_experts == 8 else "deepseek-v2-lite")
    routing = _trace_routing(tr, 60)
    py, nat = _pair(ExpertCache(tr.n_layers, tr.n_experts, capacity=cap, policy=policy, top_k=tr.top_k), costs)
    _compare(py, nat, costs, mode, routing, prefetch_size=2)


def test_a_mutation_on_either_side_is_caught(rng):
    # the comparison must be able to fail: a cache that differs in one resident diverges
    L, E, k = 2, 8, 2
    routing = _routing(rng, 20, L, E, k)
    costs = _costs(L)
    py = ExpertCache(L, E, capacity=3, policy="lru", top_k=k)
    other = ExpertCache(L, E, capacity=3, policy="lfu", top_k=k)  # another policy on the native side
    nat = engine.NativeCache.from_cache(other, costs)
    with pytest.raises(AssertionError):
        _compare(py, nat, costs, "gpu-only", routing)


def test_engine_input_errors_name_the_problem():
    costs = _costs(1)
    nat = engine.NativeCache.from_cache(ExpertCache(2, 8, capacity=2, policy="lru", top_k=2), costs)
    with pytest.raises(ValueError, match="out of range"):
        decide(nat, costs, "hybrid", 0, np.array([9]), np.array([1]))
    with pytest.raises(ValueError, match="scores"):
        decide(nat, costs, "hybrid", 0, np.array([1]), np.array([1]), np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="schedule mode"):
        decide(nat, costs, "fastest", 0, np.array([1]), np.array([1]))
    # a prefill chunk bigger than the cost tables grows them (no error, same times as Python)
    py = ExpertCache(2, 8, capacity=2, policy="lru", top_k=2)
    nat = engine.NativeCache.from_cache(copy.deepcopy(py), costs)
    a = decide(py, costs, "hybrid", 0, np.array([1, 3]), np.array([700, 300]))
    b = decide(nat, costs, "hybrid", 0, np.array([1, 3]), np.array([700, 300]))
    assert a.key() == b.key() and a.plan.makespan == b.plan.makespan


def test_runtime_with_either_engine_generates_the_same_tokens_and_decisions(tmp_path):
    """End to end (tiny model, GPU side emulated, small cache, prefetch on): the native engine and
    the Python policies make the same decisions, hence the same greedy tokens."""
    import torch

    from hybrimoe import generate, synth
    from hybrimoe.gguf_model import GGUFModel
    from hybrimoe.layer import HybridRuntime, RuntimeConfig, hybrid_factory
    from hybrimoe.models import load_gguf_model
    from hybrimoe.step import LayerDecision
    from hybrimoe.store import ExpertStore

    torch.set_num_threads(1)
    gm = GGUFModel(synth.write_gguf(synth.PRESETS["tiny"], tmp_path / "tiny.gguf"))
    store = ExpertStore(gm)
    store.pack(pin=False)
    prompt = torch.tensor([[0, 40, 41, 42, 43, 44, 45]])
    runs = {}
    for eng in ("python", "native"):
        rt = HybridRuntime(store, RuntimeConfig(cache_size=3, schedule="hybrid", gpu="emulated", device="cpu",
                                                prefetch_size=2, costs=_costs(1), record_decisions=True, engine=eng))
        assert rt.engine == eng
        model, _, _ = load_gguf_model(gm, progress=False, moe_factory=hybrid_factory(rt))
        toks, _, _ = generate.generate_ids(model, prompt, 24, rt)
        dec = [(s, d.key()) if isinstance(d, LayerDecision) else (s, d.order.layer, d.order.expert, d.slot, d.evicted)
               for s, d in rt.decisions]
        runs[eng] = (toks, dec, rt.summary())
    (ta, da, sa), (tb, db, sb) = runs["python"], runs["native"]
    assert ta == tb
    assert da == db and any(len(x) == 5 for x in da)  # prefetches were among the decisions
    for k in ("hit_rate", "demand_loads", "prefetch_loads", "prefetch_used", "experts_cpu", "experts_gpu"):
        assert sa[k] == sb[k], k


def test_decide_header_struct_and_its_numpy_twin_agree():
    from hybrimoe import cpu

    assert cpu._ext().DECIDE_HEADER_BYTES == engine.HEADER_DTYPE.itemsize == 32
    assert engine.HEADER_DTYPE.names == engine.HEADER_FIELDS
