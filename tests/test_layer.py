"""HybridMoELayer / HybridRuntime on the tiny synthetic model, GPU side emulated on the host.

Every schedule mode and cache policy must give the reference MoE output (the placement changes
where an expert runs, never what it computes); every (token, expert) pair is computed exactly
once; the cache never exceeds its budget."""

import numpy as np
import pytest
import torch

from hybrimoe.costs import CostModel, LayerCost
from hybrimoe.errors import HybrimoeError
from hybrimoe.layer import HybridMoELayer, HybridRuntime, RuntimeConfig
from hybrimoe.reference import RoutingConfig, expert_ffn, moe_forward
from hybrimoe.scheduler import MODES
from hybrimoe.stats import layer_stats
from hybrimoe.store import ExpertStore

# fp32 reference vs kernels that quantize activations to 8 bits (CPU tiers) or not (reference
# fallback): relative error of the whole output, ||y - ref|| / ||ref||.
REL_TOL = 2e-2


def _costs(store, cpu_per_tok=1e-4, gpu=2e-5, transfer=1e-4):
    """A hand-given cost model, so the plans do not depend on this machine's timing."""
    pts = (1, 4, 16, 64, 256)
    lc = LayerCost(pts, tuple(cpu_per_tok * n + 1e-4 for n in pts), tuple(gpu + 1e-7 * n for n in pts),
                   transfer, store.layout(store.layers[0]).nbytes)
    return CostModel((lc,), "test")


def _layers(m, store, rt):
    rc = RoutingConfig.from_moe_config(m.config)
    out = {}
    for layer in store.layers:
        router = torch.from_numpy(m.dequant(f"blk.{layer}.ffn_gate_inp.weight"))
        out[layer] = HybridMoELayer(rt, layer, router, rc)
    return out


def _reference(m, store, layer, x):
    experts = {e: tuple(torch.from_numpy(a) for a in store.dequant_expert(layer, e)) for e in range(m.config.n_experts)}
    router = torch.from_numpy(m.dequant(f"blk.{layer}.ffn_gate_inp.weight"))
    y, *_ = moe_forward(x, router, experts, RoutingConfig.from_moe_config(m.config))
    return y


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", ["mrs", "lru", "lfu", "bypass"])
def test_every_mode_and_policy_matches_reference(tiny, tmp_path, mode, policy):
    m, store = tiny
    tmp = tmp_path
    cfgs = RuntimeConfig(cache_size=3, policy=policy, schedule=mode, emulate_gpu=True, device="cpu",
                         prefetch_size=2, cache_dir=str(tmp), prefetch_chunk_bytes=4096)
    rt = HybridRuntime(store, cfgs)
    rt.set_costs(_costs(store))
    layers = _layers(m, store, rt)
    g = torch.Generator().manual_seed(1)
    for T in (1, 1, 64, 1):  # decode, decode, a prefill-sized batch, decode again
        for layer, mod in layers.items():
            x = torch.randn(T, m.config.hidden, generator=g)
            before = rt.stats[layer].tokens_cpu + rt.stats[layer].tokens_gpu
            y = mod(x)
            assert _rel(y, _reference(m, store, layer, x)) < REL_TOL, (mode, policy, T, layer)
            # every (token, expert) pair computed exactly once, on exactly one side
            after = rt.stats[layer].tokens_cpu + rt.stats[layer].tokens_gpu
            assert after - before == T * m.config.top_k
            for i in range(len(store.layers)):
                assert rt.cache.n_resident(i) <= 3
    s = rt.summary()
    # per-layer statistics add up to the totals (prefetch used/wasted attributed to target layers)
    per = s["per_layer"]
    assert sorted(per) == list(store.layers)
    assert sum(p["on_gpu"] for p in per.values()) == s["experts_gpu"]
    assert sum(p["on_cpu"] for p in per.values()) == s["experts_cpu"]
    assert sum(p["prefetch_used"] for p in per.values()) == s["prefetch_used"]
    assert sum(p["prefetch_wasted"] for p in per.values()) == s["prefetch_wasted"]
    if mode == "cpu-only":
        assert s["experts_gpu"] == 0 and s["pcie_bytes"] == 0
    if mode == "gpu-only":
        assert s["experts_cpu"] == 0 or s["misses"] > 0  # only bypassed loads fall back to the CPU
    if mode == "kt-static":
        assert s["demand_loads"] == 0  # kTransformers' split never loads on demand


def test_byte_budget_shared_across_layers(tiny, tmp_path):
    m, store = tiny
    slot = max(store.layout(layer).nbytes for layer in store.layers)
    rt = HybridRuntime(store, RuntimeConfig(gpu_budget=5 * slot, schedule="gpu-only", emulate_gpu=True,
                                            device="cpu", cache_dir=str(tmp_path)))
    rt.set_costs(_costs(store))
    layers = _layers(m, store, rt)
    x = torch.randn(8, m.config.hidden)
    for layer, mod in layers.items():
        assert _rel(mod(x), _reference(m, store, layer, x)) < REL_TOL
        assert rt.cache.occupancy_bytes() <= 5 * slot


def test_lookahead_prediction_is_each_next_router_top_k(tiny, tmp_path):
    """The prefetcher's prediction for layer i+d is layer i+d's own routing of layer i's input
    (one stacked matmul for all look-ahead layers: same experts and token counts as route())."""
    from hybrimoe.reference import route

    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, schedule="hybrid", emulate_gpu=True, device="cpu",
                                            prefetch_size=2, horizon=3, cache_dir=str(tmp_path)))
    layers = _layers(m, store, rt)
    rc = RoutingConfig.from_moe_config(m.config)
    n = len(store.layers)
    for T in (1, 7):
        x = torch.randn(T, m.config.hidden)
        for i in range(n):
            preds = rt.predict(i, x)
            assert sorted(preds) == list(range(i + 1, min(i + 4, n)))
            for j, p in preds.items():
                ids, _, _ = route(x, layers[store.layers[j]].router_weight, rc)
                e, c = torch.unique(ids, return_counts=True)
                assert p.experts.tolist() == e.tolist() and p.counts.tolist() == c.tolist()


def test_cpu_only_machine_runs_everything_on_cpu(tiny, tmp_path):
    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(device="cpu", emulate_gpu=False, cache_dir=str(tmp_path)))
    assert rt.schedule == "cpu-only"
    layers = _layers(m, store, rt)
    x = torch.randn(3, m.config.hidden)
    layer = store.layers[0]
    assert _rel(layers[layer](x), _reference(m, store, layer, x)) < REL_TOL
    assert rt.summary()["experts_gpu"] == 0


@pytest.mark.parametrize("T", [1, 5, 40])
def test_host_only_fast_path_equals_the_full_decision_path(tmp_path, T):
    """Without a GPU side, moe_begin skips observe / access / plan (the cache has no slots); with
    decisions recorded it takes the full sequence. Both must give bit-identical outputs (same job
    order: with 4 experts a token, float sums in another order differ) and the same counts."""
    import dataclasses

    from hybrimoe import synth
    from hybrimoe.gguf_model import GGUFModel

    m = GGUFModel(synth.write_gguf(dataclasses.replace(synth.PRESETS["tiny"], n_layers=2, top_k=4),
                                   tmp_path / "top4.gguf"))
    store = ExpertStore(m)
    outs, stats = [], []
    for record in (False, True):
        rt = HybridRuntime(store, RuntimeConfig(device="cpu", emulate_gpu=False, cache_dir=str(tmp_path),
                                                record_decisions=record))
        layers = _layers(m, store, rt)
        g = torch.Generator().manual_seed(T)
        ys = []
        for step in range(3):
            for layer in store.layers:
                ys.append(layers[layer](torch.randn(T, m.config.hidden, generator=g)))
            rt.next_step()
        assert (len(rt.decisions) > 0) == record
        outs.append(ys)
        stats.append({k: (v["misses"], v["on_cpu"], v["tokens_cpu"], v["hits"], v["steps"])
                      for k, v in layer_stats(rt).items()})
        sm = rt.summary()
        stats[-1]["summary"] = (sm["hits"], sm["misses"], sm["hit_rate"])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert stats[0] == stats[1]
    summary = stats[0].pop("summary")
    assert summary == (0, sum(s[0] for s in stats[0].values()), 0.0)  # every activated expert a miss
    assert all(s[0] > 0 and s[3] == 0 for s in stats[0].values())


def test_costs_option_takes_the_paper_testbed_or_a_file(tiny, tmp_path):
    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(device="cpu", emulate_gpu=True, costs="paper-a6000:deepseek-v2-lite"))
    assert rt.costs.name == "paper-a6000-deepseek-v2-lite" and rt.prefetcher is None
    rt.costs.save(tmp_path / "c.json")
    rt2 = HybridRuntime(store, RuntimeConfig(device="cpu", emulate_gpu=True, costs=str(tmp_path / "c.json")))
    assert rt2.costs == rt.costs
    with pytest.raises(HybrimoeError, match="cannot read it"):
        HybridRuntime(store, RuntimeConfig(device="cpu", emulate_gpu=True, costs=str(tmp_path / "none.json")))


def test_shared_expert_and_shapes(tiny, tmp_path):
    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(device="cpu", cache_dir=str(tmp_path)))
    layer = store.layers[0]
    sh = [torch.from_numpy(m.dequant(f"blk.{layer}.ffn_{w}_shexp.weight")) for w in ("gate", "up", "down")]
    router = torch.from_numpy(m.dequant(f"blk.{layer}.ffn_gate_inp.weight"))
    mod = HybridMoELayer(rt, layer, router, RoutingConfig.from_moe_config(m.config),
                         shared=lambda x: expert_ffn(x, *sh))
    x = torch.randn(2, 3, m.config.hidden)  # (B, S, H)
    y = mod(x)
    assert y.shape == x.shape
    ref = _reference(m, store, layer, x.reshape(-1, m.config.hidden)) + expert_ffn(x.reshape(-1, m.config.hidden), *sh)
    assert _rel(y.reshape(-1, m.config.hidden), ref) < REL_TOL


def test_bad_runtime_config(tiny, tmp_path):
    m, store = tiny
    with pytest.raises(HybrimoeError, match="unknown schedule"):
        HybridRuntime(store, RuntimeConfig(schedule="fastest", device="cpu"))
    with pytest.raises(HybrimoeError, match="smaller than one expert"):
        HybridRuntime(store, RuntimeConfig(gpu_budget=100, device="cpu", emulate_gpu=True))
    with pytest.raises(HybrimoeError, match="cache size"):
        HybridRuntime(store, RuntimeConfig(cache_size=99, device="cpu", emulate_gpu=True))
    if not torch.cuda.is_available():
        with pytest.raises(HybrimoeError, match="CUDA is not available"):
            HybridRuntime(store, RuntimeConfig(device="cuda"))


# --------------------------------------------------------------------------- on a GPU --------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_runtime_matches_reference(tiny, tmp_path, mode):
    """The real GPU path: slot arenas in device memory, copy streams and events, Triton kernels
    for the GPU share and the CPU kernels concurrently for the rest."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    m, _ = tiny
    store = ExpertStore(m)
    store.pack(pin=True)  # page-locked in place (transfer.host_zeros), as a CUDA run packs it
    assert store.pinned and store.arena_tensor(store.layers[0]).is_pinned()
    rt = HybridRuntime(store, RuntimeConfig(cache_size=3, schedule=mode, device="cuda", prefetch_size=2,
                                            cache_dir=str(tmp_path)))
    layers = {layer: HybridMoELayer(rt, layer, torch.from_numpy(m.dequant(f"blk.{layer}.ffn_gate_inp.weight")).cuda(),
                                    RoutingConfig.from_moe_config(m.config)) for layer in store.layers}
    for T in (1, 64, 1):
        for layer, mod in layers.items():
            x = torch.randn(T, m.config.hidden)
            y = mod(x.cuda()).cpu()
            assert _rel(y, _reference(m, store, layer, x)) < REL_TOL, (mode, T, layer)
    s = rt.summary()
    assert s["pairs_gpu"] + s["pairs_cpu"] == 66 * m.config.top_k * len(store.layers)
    if mode in ("hybrid", "gpu-only", "kt-static"):
        assert s["experts_gpu"] > 0
    rt.close()
    with pytest.raises(HybrimoeError, match="closed"):
        layers[store.layers[0]](torch.randn(1, m.config.hidden).cuda())


def test_start_up_calibration_reads_cold_experts_and_splits_the_job_overhead(tiny, tmp_path):
    """The runtime's own calibration: CPU jobs rotate over a ring of experts larger than twice
    the L3 (or every same-shape expert of the model), and the per-job overhead is measured apart
    from the per-expert time (a 2-expert job costs 2 t1 - overhead)."""
    from hybrimoe.costs import l3_bytes

    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, emulate_gpu=True, device="cpu", cache_dir=str(tmp_path)))
    cm = rt.costs
    lay = rt.layouts[0]
    same = sum(lay == other for other in rt.layouts) * m.config.n_experts
    assert cm.meta["cpu_ring_experts"] == min(same, -(-2 * l3_bytes() // lay.weight_bytes))
    lc = cm.layer(0)
    # the overhead is split from the median one-expert job, and at most half of it
    assert 0.0 <= lc.cpu_layer_overhead <= 0.5 * cm.meta["cpu_one_expert_job_s"]
    assert lc.gpu_layer_overhead == lc.cpu_layer_overhead  # the emulated GPU runs the same jobs
    assert all(v > 0 for v in lc.cpu_s) and list(lc.cpu_s) == sorted(lc.cpu_s)
    assert "method=ring-overhead" in cm.meta["shape_key"]


@pytest.mark.parametrize("policy", ["mrs", "lru"])
def test_lookahead_rides_in_the_routing_copy(tiny, tmp_path, policy):
    """moe_begin brings the look-ahead routers' top-k to the host in the routing copy (one sync
    per layer); the ids the prefetcher gets are the look-ahead routers' own, whether or not the
    full scores (MRS) share that copy."""
    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, schedule="hybrid", emulate_gpu=True, device="cpu",
                                            policy=policy, prefetch_size=2, horizon=2, cache_dir=str(tmp_path)))
    rt.set_costs(_costs(store))
    layers = _layers(m, store, rt)
    seen = []
    orig = rt._prefetch
    rt._prefetch = lambda i, la_np, p: (seen.append((i, la_np)), orig(i, la_np, p))[1]
    xs = {}
    for layer, mod in layers.items():
        xs[rt.index[layer]] = x = torch.randn(5, m.config.hidden)
        mod(x)
    assert len(seen) == len(layers)
    for i, la_np in seen:
        want = rt._lookahead_ids(i, xs[i])
        if want is None:
            assert la_np is None
        else:
            assert la_np is not None and np.array_equal(la_np, want.numpy()), i


def test_cpu_threads_default_leaves_the_gpu_driver_a_core(tiny, tmp_path, monkeypatch):
    """On CUDA the Python thread launches GPU work while the CPU experts run: the pool defaults to
    one thread less than the physical cores; an explicit cpu_threads wins; no GPU: all cores."""
    from hybrimoe import cpu

    m, store = tiny
    before = cpu.num_threads()
    try:
        HybridRuntime(store, RuntimeConfig(device="cpu", cache_dir=str(tmp_path)))
        assert cpu.num_threads() == before
        HybridRuntime(store, RuntimeConfig(device="cpu", cpu_threads=1, cache_dir=str(tmp_path)))
        assert cpu.num_threads() == 1
        if torch.cuda.is_available():
            HybridRuntime(store, RuntimeConfig(device="cuda", cache_size=2, cache_dir=str(tmp_path)))
            assert cpu.num_threads() == max(1, cpu.physical_cores() - 1)
    finally:
        cpu.set_num_threads(before)


def test_close_is_final(tiny, tmp_path):
    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(cache_size=2, emulate_gpu=True, device="cpu", prefetch_size=2,
                                            cache_dir=str(tmp_path)))
    rt.set_costs(_costs(store))
    layers = _layers(m, store, rt)
    layer = store.layers[0]
    x = torch.randn(2, m.config.hidden)
    assert _rel(layers[layer](x), _reference(m, store, layer, x)) < REL_TOL
    rt.close()
    assert rt.transfers.pending_bytes() == 0
    with pytest.raises(HybrimoeError, match="closed"):
        layers[layer](x)
