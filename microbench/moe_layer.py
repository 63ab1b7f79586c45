"""MoE layer stack benchmark: every schedule mode side by side on one machine.

A DeepSeek-V2-Lite-shaped stack (8 MoE layers, 64 experts, top-6, 2048/1408, Q4_K gate/up and
Q5_0/Q8_0 down as a real Q4_K_M file) at decode (1 token) and prefill (512 tokens), with the GPU
cache at 25% and 50% of the experts, for hybrid / kt-static / gpu-only / cpu-only / seed, plus
the all-experts-on-GPU bound (cache 100%). Rows report the time per MoE layer, the speed-up over
kt-static (x_vs_kt_static) and the fraction of the all-on-GPU bound (frac_of_all_gpu).
On CUDA it also measures pinned host->device copies at expert size against a large plain copy
(frac_of_memcpy_bw, goal >= 0.9) and one layer's GPU compute with and without concurrent copies.

--quick (CPU, under a minute): the tiny preset with the GPU side emulated on the host — checks
that every mode runs and agrees with the reference; the times then say nothing about a GPU.

    python microbench/moe_layer.py --json out.json [--quick] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402

from hybrimoe import synth  # noqa: E402
from hybrimoe.gguf_model import GGUFModel  # noqa: E402
from hybrimoe.layer import HybridMoELayer, HybridRuntime, RuntimeConfig  # noqa: E402
from hybrimoe.reference import RoutingConfig, moe_forward  # noqa: E402
from hybrimoe.scheduler import MODES  # noqa: E402
from hybrimoe.store import ExpertStore  # noqa: E402
from hybrimoe.transfer import clear_cuda_error  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build_stack(gm, store, cfg: RuntimeConfig):
    rt = HybridRuntime(store, cfg)
    rc = RoutingConfig.from_moe_config(gm.config)
    layers = [HybridMoELayer(rt, layer, torch.from_numpy(gm.dequant(f"blk.{layer}.ffn_gate_inp.weight")).to(rt.device),
                             rc) for layer in store.layers]
    return rt, layers


def time_stack(rt, layers, tokens: int, reps: int, dtype) -> float:
    """Median seconds of one pass of `tokens` tokens through every MoE layer (fresh x per layer)."""
    H = rt.store.config.hidden
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(tokens, H, generator=g).to(rt.device, dtype) for _ in layers]
    ts = []
    for r in range(reps + 1):
        _sync(rt.device)
        t0 = time.perf_counter()
        for x, mod in zip(xs, layers):
            mod(x)
        _sync(rt.device)
        if r:  # first pass warms caches and compiles kernels
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def check_stack(gm, store, rt, layers, dtype) -> float:
    """Worst relative error of the stack's layers vs the reference MoE on 3 tokens."""
    worst = 0.0
    # x rounded to the run dtype first, and that same x fed to both sides: the reference on the
    # float32 original picks different experts for near-tied scores (~1 call in 4 under bf16)
    x = torch.randn(3, gm.config.hidden).to(dtype).float()
    rc = RoutingConfig.from_moe_config(gm.config)
    for layer, mod in zip(store.layers, layers):
        experts = lambda e, layer=layer: tuple(torch.from_numpy(a) for a in store.dequant_expert(layer, e))  # noqa: E731
        ref, *_ = moe_forward(x, mod.router_weight.cpu(), experts, rc)
        y = mod(x.to(rt.device, dtype)).float().cpu()
        worst = max(worst, float((y - ref).norm() / ref.norm()))
    return worst


def h2d_rows(nbytes: int, dev) -> list[dict]:
    from hybrimoe.transfer import measure_h2d

    small = measure_h2d(nbytes, dev, reps=50)
    big_n = 256 << 20
    big = measure_h2d(big_n, dev, reps=5)
    ceiling = big["pinned"]["gbps"]
    return [{"name": f"h2d-{k}", "shape": f"{nbytes} B (one expert)", "tokens": 0,
             "median_us": v["seconds"] * 1e6, "gbps": v["gbps"], "frac_of_memcpy_bw": v["gbps"] / ceiling,
             "ceiling_gbps": ceiling} for k, v in small.items()]


def _page_span(parts, page: int = 4096) -> tuple[int, int]:
    """(start, size) of the one page-rounded range that covers every numpy array in `parts`.
    One range, not one per tensor: adjacent tensors share a boundary page, and registering a page
    twice fails (cudaErrorHostMemoryAlreadyRegistered, 712)."""
    starts = [p.__array_interface__["data"][0] for p in parts]
    lo = min(b - b % page for b in starts)
    hi = max((b + p.nbytes + page - 1) // page * page for b, p in zip(starts, parts))
    return lo, hi - lo


def pin_strategy_rows(gm, store, dev) -> list[dict]:
    """Issue 2's question: copy an expert from the packed pinned arena (one DMA) or from the GGUF
    mmap registered in place with cudaHostRegister (three DMAs: gate, up, down tensors)?
    A failed registration is recorded in the row, never raised."""
    layer = store.layers[0]
    lay = store.layout(layer)
    dst = torch.empty(lay.nbytes, dtype=torch.uint8, device=dev)
    arena = store.arena_tensor(layer)
    rows = []

    def timed(fn, reps=30):
        fn()
        torch.cuda.synchronize(dev)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(dev)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_arena = timed(lambda: dst.copy_(arena[1], non_blocking=True))
    rows.append({"name": "expert-copy/pinned-arena", "shape": lay.describe(), "tokens": 0,
                 "median_us": t_arena * 1e6, "gbps": lay.weight_bytes / t_arena / 1e9})
    cudart = torch.cuda.cudart()
    parts = [gm.raw(f"blk.{layer}.ffn_{w}_exps.weight") for w in ("gate", "up", "down")]
    start, size = _page_span(parts)  # the three tensors' pages (and any between them) in one range
    registered = False
    try:
        err = cudart.cudaHostRegister(start, size, 8 | 2)  # ReadOnly | Mapped (file maps are read-only)
        if int(err) != 0:
            clear_cuda_error()
            raise RuntimeError(f"cudaHostRegister({size} B) failed with {err}")
        registered = True
        views = [torch.from_numpy(p[1].reshape(-1)) for p in parts]
        offs = (lay.gate_offset, lay.up_offset, lay.down_offset)

        def three():
            for v, o in zip(views, offs):
                dst[o:o + v.numel()].copy_(v, non_blocking=True)

        t_reg = timed(three)
        rows.append({"name": "expert-copy/mmap-registered", "shape": lay.describe(), "tokens": 0,
                     "median_us": t_reg * 1e6, "gbps": lay.weight_bytes / t_reg / 1e9,
                     "x_vs_pinned_arena": t_arena / t_reg, "registered_bytes": size})
    except Exception as e:  # noqa: BLE001 - report, do not fail the whole benchmark
        rows.append({"name": "expert-copy/mmap-registered", "shape": lay.describe(), "tokens": 0,
                     "median_us": None, "error": str(e)})
    finally:
        if registered:
            torch.cuda.synchronize(dev)  # no copy may still read the pages
            if int(cudart.cudaHostUnregister(start)) != 0:
                clear_cuda_error()
    return rows


def overlap_rows(gm, store, dev, dtype, calls: int = 20, max_copies: int = 4000) -> list[dict]:
    """One layer's GPU compute (6 resident experts, 1 and 512 tokens) alone and with copies running.
    The copies queued are sized from the compute time measured alone (with a margin), so that they
    run during all `calls` computes; median of per-call event timings."""
    import math

    from hybrimoe import gpu

    layer = store.layers[0]
    lay = store.layout(layer)
    n_slots = 16
    arena = torch.empty((n_slots, lay.nbytes), dtype=torch.uint8, device=dev)
    host = store.arena_tensor(layer)
    for s in range(n_slots):
        arena[s, : host.shape[1]].copy_(host[s])
    slot_of = torch.full((gm.config.n_experts,), -1, dtype=torch.int32, device=dev)
    slot_of[:6] = torch.arange(6, dtype=torch.int32, device=dev)
    copy_stream = torch.cuda.Stream(dev)

    def queue_copies(n):
        with torch.cuda.stream(copy_stream):
            for k in range(n):
                arena[6 + k % 10, : host.shape[1]].copy_(host[6 + k % 10], non_blocking=True)

    # seconds per expert copy on this link, with the copy stream to itself
    queue_copies(2)
    torch.cuda.synchronize(dev)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(copy_stream)
    queue_copies(20)
    b.record(copy_stream)
    torch.cuda.synchronize(dev)
    copy_s = max(a.elapsed_time(b) / 20 / 1e3, 1e-6)
    rows = []
    for tokens in (1, 512):
        x = torch.randn(tokens, lay.hidden, device=dev, dtype=dtype)
        ids = torch.randint(0, 6, (tokens, 1), device=dev, dtype=torch.int32)
        w = torch.ones(tokens, 1, device=dev)
        res, n_copies, covered = {}, 0, None
        for copies in (False, True):
            for _ in range(3):
                gpu.moe_forward(x, ids, w, slot_of, arena, lay)
            torch.cuda.synchronize(dev)
            if copies:  # enough to outlast every call: x1.5 + 4 over the window measured alone
                window_s = res[False] * 1e-6 * calls
                n_copies = min(max_copies, math.ceil(1.5 * window_s / copy_s) + 4)
                queue_copies(n_copies)
                copies_done = torch.cuda.Event(enable_timing=True)
                copies_done.record(copy_stream)
            evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(calls)]
            for st, en in evs:
                st.record()
                gpu.moe_forward(x, ids, w, slot_of, arena, lay)
                en.record()
            torch.cuda.synchronize(dev)
            res[copies] = statistics.median(st.elapsed_time(en) * 1e3 for st, en in evs)
            if copies:  # did the copies really run until the last call ended?
                covered = evs[-1][1].elapsed_time(copies_done) >= 0
        rows.append({"name": "gpu-compute-with-copies", "shape": lay.describe(), "tokens": tokens,
                     "median_us": res[True], "alone_us": res[False], "x_vs_alone": res[False] / res[True],
                     "copies": n_copies, "copy_us": copy_s * 1e6, "copies_outlast_compute": covered})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="CPU-sized: tiny preset, emulated GPU, < 1 minute")
    ap.add_argument("--layers", type=int, default=8, help="MoE layers in the stack")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = "dsv2-lite" if not args.quick else "tiny"
    n_layers = synth.PRESETS[preset].leading_dense + (args.layers if not args.quick else 3)
    prefill = args.prefill if not args.quick else 64
    t0 = time.perf_counter()
    path = synth.ensure_preset(preset, n_layers=n_layers, progress=True)
    gm = GGUFModel(path)
    store = ExpertStore(gm)
    store.pack()
    print(f"# {gm} ready in {time.perf_counter() - t0:.1f} s; device {dev}", flush=True)
    E = gm.config.n_experts
    lay = store.layout(store.layers[0])
    shape = f"{preset} x{len(store.layers)} MoE layers ({lay.describe()})"
    rows: list[dict] = []
    if cuda:
        rows += h2d_rows(lay.nbytes, dev)
        rows += overlap_rows(gm, store, dev, dtype)
    fracs = (0.25, 0.5)
    results = {}
    for tokens, reps in ((1, max(args.reps * 4, 10)), (prefill, args.reps)):
        # the all-experts-on-GPU bound: every expert resident, nothing moves
        configs = [("all-gpu", 1.0, "gpu-only")] + [(m, f, m) for f in fracs for m in MODES]
        for name, frac, mode in configs:
            cfg = RuntimeConfig(cache_size=int(E * frac), schedule=mode, policy="mrs", device=str(dev),
                                emulate_gpu=not cuda, prefetch_size=0)
            rt, layers = build_stack(gm, store, cfg)
            if tokens == 1 and name in ("all-gpu", "hybrid") and frac in (1.0, 0.25):
                err = check_stack(gm, store, rt, layers, dtype)
                if err > 5e-2:
                    raise SystemExit(f"{name}: output differs from the reference (relative error {err:.3g})")
            t = time_stack(rt, layers, tokens, reps, dtype)
            s = rt.summary()
            key = (tokens, frac, name)
            results[key] = t
            rows.append({"name": f"{name}/cache{int(frac * 100)}%", "shape": shape, "tokens": tokens,
                         "median_us": t / len(layers) * 1e6, "mode": mode, "cache_frac": frac,
                         "hit_rate": s["hit_rate"], "experts_gpu": s["experts_gpu"], "experts_cpu": s["experts_cpu"],
                         "pcie_mb": s["pcie_bytes"] / 1e6, "cpu_tier": s["cpu_tier"],
                         **{f"host_{k}_us": v for k, v in s["host_us"].items()}})
            rt.close()
            del rt, layers
            if cuda:
                torch.cuda.empty_cache()
            # partial results survive a time limit (run_gpu.sh gives each benchmark a budget)
            write_results("moe_layer", rows, args.json, quick=args.quick, emulated_gpu=not cuda, partial=True)
    if cuda:  # after the main rows are written: cudaHostRegister on a file map is the riskiest call
        rows += pin_strategy_rows(gm, store, dev)
    for r in rows:
        if "cache_frac" not in r:
            continue
        base = results.get((r["tokens"], r["cache_frac"], "kt-static"))
        bound = results.get((r["tokens"], 1.0, "all-gpu"))
        t = r["median_us"] * len(store.layers) / 1e6
        r["x_vs_kt_static"] = base / t if base else None
        r["frac_of_all_gpu"] = bound / t if bound else None
    doc = write_results("moe_layer", rows, args.json, quick=args.quick, emulated_gpu=not cuda)
    print_table(doc["rows"], ["name", "tokens", "median_us", "x_vs_kt_static", "frac_of_all_gpu", "hit_rate",
                              "experts_gpu", "experts_cpu", "gbps", "frac_of_memcpy_bw", "x_vs_alone"])
    if not cuda:
        print("# no CUDA (or --quick): GPU side emulated on the host; these times are not GPU figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
