"""Host time per MoE layer: what the runtime's decisions cost the Python thread.

On a GPU a DeepSeek-V2-Lite MoE layer at one token is a few tens of microseconds of kernels and a
CPU share of similar size on a many-core host, so the Python that routes, updates the cache,
plans, and chooses prefetches (hybrimoe/layer.py `moe_begin`) is on the critical path of every
layer: 26 layers x 0.5 ms would be 13 ms per token. This measures that host time with the
runtime's own objects, on a model with DSv2-Lite's routing shape (64 experts, top-6, 8 MoE
layers) but tiny widths (hidden 256), so that the kernels and the copies they queue are noise.
The GPU side is emulated on the host (its kernel time is excluded: `gpu_s`); decisions use the
`paper-a6000` cost model so that loads and prefetches happen as on a GPU box.

Rows: per schedule mode (and hybrid with prefetch 2), the median over decode steps of the host
time per layer, split into routing (the device->host copy; on a CPU tensor it is only the
gather), planning (MRS update, cache access, plan, loads issued, CPU job prepared) and prefetch
(look-ahead predictions, impact-driven choice, chunks issued). Routing replayed from the FLAME
trace in ../shared/traces when present (real reuse and prediction accuracy), else the routers.
Yardstick measured in the same run (`frac_of_layer_cpu_job`): the CPU job of one real-width
DSv2-Lite layer at one token (6 experts) on the same thread pool, i.e. the work the host time
delays on a CPU-only machine and runs beside on a GPU box. The pool gets the physical cores less
one, as on CUDA, so that the Python thread has a core.

    python microbench/host_overhead.py [--json PATH] [--quick] [--steps N] [--trace PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from hybrimoe import cpu, formats, synth  # noqa: E402
from hybrimoe.gguf_model import GGUFModel  # noqa: E402
from hybrimoe.layer import HybridMoELayer, HybridRuntime, RuntimeConfig  # noqa: E402
from hybrimoe.reference import RoutingConfig  # noqa: E402
from hybrimoe.store import ExpertStore  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FLAME = os.path.join(HERE, "..", "..", "shared", "traces", "flame-moe-290m_dynande",
                     "flame290m_prefill_4x512tok_8layers_top6.npz")
# DSv2-Lite's routing (64 experts, top-6, 1 dense + 8 MoE layers as the FLAME trace has) at tiny widths
CONFIG = dataclasses.replace(synth.PRESETS["tiny"], n_layers=9, n_experts=64, top_k=6, expert_ffn=128,
                             n_shared=0, shared_ffn=0, weights="blocks", name="host-dsv2-routing")
CONFIGS = [("kt-static", 0), ("seed", 0), ("gpu-only", 0), ("hybrid", 0), ("hybrid", 2)]


def build(tmp: str):
    path = synth.write_gguf(CONFIG, os.path.join(tmp, "host.gguf"))
    gm = GGUFModel(path)
    store = ExpertStore(gm)
    store.pack()
    return gm, store


def run(store, gm, mode: str, prefetch: int, steps: int, trace, seed: int = 0, engine: str = "auto") -> dict:
    cfg = RuntimeConfig(cache_size=gm.config.n_experts // 4, schedule=mode, prefetch_size=prefetch,
                        emulate_gpu=True, device="cpu", costs="paper-a6000", engine=engine,
                        cpu_threads=max(1, cpu.physical_cores() - 1))  # one core left to Python, as on CUDA
    rt = HybridRuntime(store, cfg)
    g = torch.Generator().manual_seed(seed)
    H, E = gm.config.hidden, gm.config.n_experts
    rc = RoutingConfig(gm.config.top_k)
    layers = [HybridMoELayer(rt, layer, torch.randn(E, H, generator=g) / H ** 0.5, rc) for layer in rt.moe_layers]
    if trace is not None:
        from e2e import TraceRouting

        rt.route_override = TraceRouting(trace, rt.moe_layers, gm.config.top_k, E)
    per_layer = []  # (sync, plan, prefetch) seconds of each layer call
    with torch.no_grad():
        for step in range(steps):
            rt.next_step()
            for mod in layers:
                st = rt.stats[mod.layer]
                before = (st.sync_s, st.plan_s, st.prefetch_s)
                mod(torch.randn(1, H, generator=g))
                per_layer.append((st.sync_s - before[0], st.plan_s - before[1], st.prefetch_s - before[2]))
    s = rt.summary()
    rt.close()
    engine_used = s["engine"]
    a = np.asarray(per_layer[len(layers):])  # the first step warms the caches of every path
    tot = a.sum(1)
    return {"sync_us": float(np.median(a[:, 0]) * 1e6), "plan_us": float(np.median(a[:, 1]) * 1e6),
            "prefetch_us": float(np.median(a[:, 2]) * 1e6), "median_us": float(np.median(tot) * 1e6),
            "mean_us": float(tot.mean() * 1e6), "p90_us": float(np.percentile(tot, 90) * 1e6), "hit_rate": s["hit_rate"],
            "demand_loads": s["demand_loads"], "prefetch_loads": s["prefetch_loads"],
            "prefetch_accuracy": s.get("prefetch_accuracy"), "engine_used": engine_used}


def layer_cpu_job_s(sets: int, reps: int, threads: int) -> float:
    """Yardstick measured in the same run: median seconds of the CPU job of one real-width
    DeepSeek-V2-Lite MoE layer at one token (6 experts: Q4_K gate/up 1408x2048, Q5_0 down
    2048x1408) on the same pool, rotating through `sets` such layers (weights partly cold)."""
    rng = np.random.default_rng(0)

    def qt(qtype, rows, cols):
        return formats.QuantTensor(synth.random_blocks(qtype, rows, cols, 0.02, rng), qtype, (rows, cols))

    layers = [[cpu.PreparedExpert(qt(formats.Q4_K, 1408, 2048), qt(formats.Q4_K, 1408, 2048),
                                  qt(formats.Q5_0, 2048, 1408)) for _ in range(6)] for _ in range(sets)]
    x = torch.randn(1, 2048)
    tok, w = [np.zeros(1, np.int64)] * 6, [np.full(1, 1 / 6, np.float32)] * 6
    cpu.set_num_threads(threads)
    ts = []
    for r in range(reps):
        t = time.perf_counter()
        cpu.moe_ffn(x, layers[r % sets], tok, w)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts[sets:]))


def decide_us(trace, engine: str, tokens: int, mode: str = "hybrid", reps: int = 60) -> tuple[float, float]:
    """Median microseconds per layer of the decisions alone, on the replayed routing, `tokens`
    consecutive trace tokens per call, cache 16 (MRS), paper-a6000 costs, either engine (the
    native one timed with its Python wrapper): (hybrimoe.step.decide: observe, access, plan, pin,
    admit; hybrimoe.step.prefetch with prefetch 2: choice and admission, on the true experts of the
    next 3 layers as predictions with confidence 0.8 and an idle link)."""
    import copy

    from hybrimoe import engine as native
    from hybrimoe.cache import ExpertCache
    from hybrimoe.costs import CostModel
    from hybrimoe.prefetch import Prediction, Prefetcher
    from hybrimoe.step import decide, prefetch, release

    costs = CostModel.paper_a6000("deepseek-v2-lite")
    pf = Prefetcher(costs, 2, 3, mode)
    cache = ExpertCache(trace.n_layers, trace.n_experts, capacity=16, policy="mrs", top_k=trace.top_k)
    if engine == "native":
        cache = native.NativeCache.from_cache(copy.deepcopy(cache), costs)
    n = min(reps, trace.n_tokens // tokens)
    ts, tp = [], []
    L = trace.n_layers
    for s in range(n):
        tok = slice(s * tokens, (s + 1) * tokens)
        routed = [np.unique(trace.expert_ids[tok, j], return_counts=True) for j in range(L)]
        for j in range(L):
            e, c = routed[j]
            sc = trace.score_matrix(tok, j)
            e = e.astype(np.int64)
            preds = {t: Prediction(routed[t][0].astype(np.int64), routed[t][1], np.full(len(routed[t][0]), 0.8))
                     for t in range(j + 1, min(j + 4, L))}
            idle = {t: 1.0 for t in preds}
            t0 = time.perf_counter()
            decide(cache, costs, mode, j, e, c, sc)
            t1 = time.perf_counter()
            prefetch(cache, pf, j, preds, idle_before=idle)
            t2 = time.perf_counter()
            release(cache, j)
            ts.append(t1 - t0)
            tp.append(t2 - t1)
    k = len(ts) // 4
    return float(np.median(ts[k:]) * 1e6), float(np.median(tp[k:]) * 1e6)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per configuration (default 200, quick 60)")
    ap.add_argument("--engine", default="auto", choices=("auto", "native", "python"),
                    help="who takes the per-layer decisions (RuntimeConfig.engine)")
    ap.add_argument("--trace", default=FLAME if os.path.exists(FLAME) else None,
                    help="routing trace to replay (default: FLAME-290M when ../shared/traces is there)")
    args = ap.parse_args(argv)
    steps = args.steps or (60 if args.quick else 200)
    torch.set_num_threads(1)
    trace = None
    if args.trace:
        from hybrimoe.traces import load_trace

        trace = load_trace(args.trace)
    with tempfile.TemporaryDirectory() as tmp:
        gm, store = build(tmp)
        rows = []
        for mode, pf in CONFIGS:
            r = run(store, gm, mode, pf, steps, trace, engine=args.engine)
            rows.append({"name": f"{mode}/pf{pf}", "shape": f"{CONFIG.n_layers - 1} MoE layers, 64 experts top-6, "
                         "cache 16", "tokens": 1, "steps": steps, "mode": mode, "prefetch": pf,
                         "routing": os.path.basename(args.trace) if trace is not None else "router",
                         "engine": args.engine, **r})
    job_us = layer_cpu_job_s(2 if args.quick else 4, 20 if args.quick else 60,
                             max(1, cpu.physical_cores() - 1)) * 1e6
    base = next(r["median_us"] for r in rows if r["mode"] == "kt-static")
    for r in rows:
        r["x_vs_kt-static"] = base / r["median_us"]
        r["layer_cpu_job_us"] = job_us
        r["frac_of_layer_cpu_job"] = r["median_us"] / job_us
    print_table(rows, ["name", "median_us", "mean_us", "p90_us", "sync_us", "plan_us", "prefetch_us", "x_vs_kt-static",
                       "frac_of_layer_cpu_job",
                       "hit_rate", "demand_loads", "prefetch_loads"])
    if trace is not None:  # the decisions alone, both engines, at one token and a 64-token chunk
        from hybrimoe import engine as native

        drows = []
        for T in (1, 64):
            for eng in ("python", "native") if native.available() else ("python",):
                d, p = decide_us(trace, eng, T)
                drows.append({"name": f"decisions/{eng}/T{T}", "shape": "replayed routing, 8 MoE layers, 64 experts top-6, "
                              "cache 16 (mrs), prefetch 2", "engine": eng, "tokens": T, "mode": "hybrid",
                              "decide_us": d, "prefetch_choice_us": p})
        print_table(drows, ["name", "decide_us", "prefetch_choice_us"])
        rows += drows
    write_results("host_overhead", rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
