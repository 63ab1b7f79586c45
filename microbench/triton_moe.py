"""Microbenchmark of the fused Triton MoE kernels (hybrimoe.gpu.moe_forward) on the GPU.

    python microbench/triton_moe.py [--json PATH] [--quick] [--tune] [--shapes dsv2_lite,...]
                                    [--tokens 1,4,16] [--budget-s 300]

GPU mode, in one run and on one device:
  * copy_bw:        device copy bandwidth (torch copy of a 2 GiB buffer; bytes read + written),
                    the ceiling every frac_of_copy_bw is a fraction of;
  * triton_moe:     moe_forward (3 launches decode, + torch align ops prefill) on the quantized arena;
  * cublas_bf16:    the same MoE with torch/cuBLAS bf16 on weights dequantized beforehand
                    (what a user would otherwise run: per-expert gather, mm, silu*mul, mm, index_add);
  * dequant_cublas: dequantize the active experts (our Triton dequant) into bf16, then cuBLAS;
  * cuda_q4k_gemv:  the plain CUDA Q4_K GEMV (kernels/cuda) over one expert's gate and up matrices
                    at 1 token: a hand-written second opinion on the decode roofline.
Row fields: median_us (and p20/p80) per call; gb_per_s = packed weight bytes of the experts the
call really reads / median; frac_of_copy_bw = gb_per_s / copy_bw; x_vs_cublas_bf16 = cublas_bf16's
median / this row's median (> 1: faster than cuBLAS bf16 on pre-dequantized weights).
Each variant is checked against cublas_bf16 before timing, captured in a CUDA graph over R
rotations of the routing (R chosen so the weights touched exceed 4x L2), replayed; median and
20/80 percentiles per call. Bytes moved count the packed blocks of the experts really read.
Shapes: DeepSeek-V2-Lite, Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3 (one layer, all experts resident).

--tune sweeps launch configurations on the first shape and adds "best_configs" to the JSON, in the
form kernels/triton/configs.json's devices[<name>] takes (paste it there; the shipped configs are
hand-picked, untuned).

Without CUDA: --quick runs one tiny correctness case in Triton's CPU interpreter and writes rows
with the reference's CPU timing (no GPU numbers); without --quick it exits with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

# name: (hidden, inter, experts, top_k, gate, up, down type names)
SHAPES = {
    "dsv2_lite": (2048, 1408, 64, 6, "Q4_K", "Q4_K", "Q8_0"),
    "mixtral": (4096, 14336, 8, 2, "Q4_K", "Q4_K", "Q6_K"),
    "qwen3_30b_a3b": (2048, 768, 128, 8, "Q4_K", "Q4_K", "Q6_K"),
    "deepseek_v3": (7168, 2048, 256, 8, "Q4_K", "Q4_K", "Q6_K"),
}
TOKENS = [1, 4, 16, 64, 256, 1024]
QUICK_SHAPES = ["dsv2_lite", "qwen3_30b_a3b"]
QUICK_TOKENS = [1, 16, 256]
L2_BYTES_FALLBACK = 60 * 2**20
MOE_TOL = 2e-2   # MoE variants vs cublas_bf16: bf16 operands on both sides, different rounding points
GEMV_TOL = 1e-4  # cuda_q4k_gemv vs dequantize() @ x: float32 both sides, only the summation order differs


def _layout(shape):
    from hybrimoe import formats
    from hybrimoe.layout import ExpertLayout

    hid, inter, _, _, g, u, d = shape
    return ExpertLayout(hid, inter, getattr(formats, g), getattr(formats, u), getattr(formats, d))


def _stats(samples_us):
    s = sorted(samples_us)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


# ----------------------------------------------------------------------------- GPU timing
def _time_graph(fn, n_rot, reps=20, warmup=3):
    """Capture fn(r) for r in range(n_rot) in one CUDA graph; per-call times (us) of `reps` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for r in range(n_rot):  # warm up: compile, allocate
            fn(r)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(n_rot):
            fn(r)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / n_rot)
    del graph
    return out


def copy_bandwidth_gbs(nbytes=2 * 2**30):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = _time_graph(lambda r: dst.copy_(src), 1, reps=10)
    med, _, _ = _stats(times)
    src = dst = None  # noqa: F841 - free the 4 GiB before the experts are allocated
    torch.cuda.empty_cache()
    return 2 * nbytes / (med * 1e-6) / 1e9


class Problem:
    """One layer's arena (all experts resident), dense bf16 twins, and R routings."""

    def __init__(self, name, shape, max_tokens, gen, l2_bytes):
        from hybrimoe import gpu

        self.name, self.shape = name, shape
        self.layout = lay = _layout(shape)
        hid, inter, n_exp, k = shape[:4]
        self.n_exp, self.k = n_exp, k
        self.arena = gpu.random_arena(lay, n_exp, gen, device="cuda")
        self.slot = torch.arange(n_exp, dtype=torch.int32, device="cuda")
        self.dense = None  # lazily: list of (gate, up, down) bf16
        self.gen = gen
        self.l2_bytes = l2_bytes

    def dense_weights(self):
        from hybrimoe import gpu

        if self.dense is None:
            lay, dense = self.layout, []
            for e in range(self.n_exp):
                g, u, d = (
                    gpu.dequantize(self.arena[e, off:off + nb], qt, shp, torch.bfloat16)
                    for off, nb, qt, shp in (
                        (lay.gate_offset, lay.gate_bytes, lay.gate_type, (lay.inter, lay.hidden)),
                        (lay.up_offset, lay.up_bytes, lay.up_type, (lay.inter, lay.hidden)),
                        (lay.down_offset, lay.down_bytes, lay.down_type, (lay.hidden, lay.inter))))
                dense.append((g, u, d))
            self.dense = dense
        return self.dense

    def routings(self, t):
        """R routings (x, ids, wts, per-expert token lists) so that R * bytes touched > 4 * L2."""
        lay = self.layout
        rots, touched = [], 0
        while touched < 4 * self.l2_bytes or len(rots) < 2:
            x = torch.randn(t, lay.hidden, device="cuda", dtype=torch.bfloat16, generator=self.gen)
            logits = torch.randn(t, self.n_exp, device="cuda", generator=self.gen)
            wts, ids = torch.topk(torch.softmax(logits, -1), self.k)
            ids_cpu = ids.cpu()
            groups = []
            for e in torch.unique(ids_cpu).tolist():
                tok, kk = (ids_cpu == e).nonzero(as_tuple=True)
                groups.append((e, tok.cuda(), kk.cuda()))
            n_active = len(groups)
            rots.append((x, ids, wts, groups, n_active))
            touched += n_active * lay.weight_bytes
            if len(rots) >= 64:
                break
        return rots


def _cublas_moe(x, wts, groups, dense, out):
    out.zero_()
    for e, tok, kk in groups:
        g, u, d = dense[e]
        xe = x.index_select(0, tok)
        he = torch.nn.functional.silu(xe @ g.T) * (xe @ u.T)
        ye = (he @ d.T).float() * wts[tok, kk][:, None]
        out.index_add_(0, tok, ye)
    return out


def _dequant_cublas_moe(x, wts, groups, prob, out):
    from hybrimoe import gpu

    lay = prob.layout
    out.zero_()
    for e, tok, kk in groups:
        a = prob.arena[e]
        g = gpu.dequantize(a[lay.gate_offset:lay.gate_offset + lay.gate_bytes], lay.gate_type,
                           (lay.inter, lay.hidden), torch.bfloat16)
        u = gpu.dequantize(a[lay.up_offset:lay.up_offset + lay.up_bytes], lay.up_type,
                           (lay.inter, lay.hidden), torch.bfloat16)
        d = gpu.dequantize(a[lay.down_offset:lay.down_offset + lay.down_bytes], lay.down_type,
                           (lay.hidden, lay.inter), torch.bfloat16)
        xe = x.index_select(0, tok)
        he = torch.nn.functional.silu(xe @ g.T) * (xe @ u.T)
        out.index_add_(0, tok, (he @ d.T).float() * wts[tok, kk][:, None])
    return out


def _rel_err(got, ref) -> float:
    return (torch.linalg.vector_norm(got.float() - ref) / torch.linalg.vector_norm(ref)).item()


def bench_problem(prob, tokens, copy_gbs, rows, config=None, variants=("triton_moe", "cublas_bf16",
                                                                       "dequant_cublas"), t_end=None):
    """Rows for each token count and variant; no new token count once time.time() > t_end."""
    from hybrimoe import gpu

    lay = prob.layout
    for i, t in enumerate(tokens):
        if t_end is not None and time.time() > t_end:
            print(f"  {prob.name}: time budget spent: skipping tokens {tokens[i:]}", flush=True)
            break
        rots = prob.routings(t)
        n_rot = len(rots)
        outs = [torch.empty(t, lay.hidden, device="cuda") for _ in range(n_rot)]
        bytes_per_call = sum(r[4] for r in rots) / n_rot * lay.weight_bytes
        fns = {
            "triton_moe": lambda r: gpu.moe_forward(rots[r][0], rots[r][1], rots[r][2], prob.slot,
                                                    prob.arena, lay, out=outs[r], config=config),
            "cublas_bf16": lambda r: _cublas_moe(rots[r][0], rots[r][2], rots[r][3],
                                                 prob.dense_weights(), outs[r]),
            "dequant_cublas": lambda r: _dequant_cublas_moe(rots[r][0], rots[r][2], rots[r][3],
                                                            prob, outs[r]),
        }
        # correctness first: each variant against cuBLAS on dequantized weights, rotation 0
        ref = _cublas_moe(rots[0][0], rots[0][2], rots[0][3], prob.dense_weights(),
                          torch.empty(t, lay.hidden, device="cuda")).clone()
        base_us = None
        for v in variants:
            rel = _rel_err(fns[v](0).clone(), ref)
            ok = rel <= MOE_TOL
            times = _time_graph(fns[v], n_rot)
            med, p20, p80 = _stats(times)
            if v == "cublas_bf16":
                base_us = med
            gbs = bytes_per_call / (med * 1e-6) / 1e9
            rows.append({
                "name": v, "shape": prob.name, "hidden": lay.hidden, "inter": lay.inter,
                "experts": prob.n_exp, "top_k": prob.k, "tokens": t, "types": lay.describe(),
                "median_us": round(med, 2), "p20_us": round(p20, 2), "p80_us": round(p80, 2),
                "rotations": n_rot, "weight_bytes_per_call": int(bytes_per_call),
                "gb_per_s": round(gbs, 1), "frac_of_copy_bw": round(gbs / copy_gbs, 3),
                "rel_err_vs_cublas": round(rel, 5), "correct": ok,
            })
            print(f"  {prob.name:14s} T={t:5d} {v:15s} {med:10.1f} us  {gbs:8.1f} GB/s "
                  f"({gbs / copy_gbs:5.1%} of copy)  err {rel:.2e}", flush=True)
        for row in rows:
            if row["shape"] == prob.name and row["tokens"] == t and base_us:
                row["x_vs_cublas_bf16"] = round(base_us / row["median_us"], 3)


def bench_cuda_gemv(prob, copy_gbs, rows):
    from hybrimoe import gpu
    from hybrimoe.formats import Q4_K

    lay = prob.layout
    if lay.gate_type != Q4_K:
        return
    try:
        gpu._cuda_gemv_lib()
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"  cuda_q4k_gemv skipped: {exc}")
        return
    n_rot = max(2, int(4 * prob.l2_bytes // (2 * lay.gate_bytes)) + 1)
    n_rot = min(n_rot, prob.n_exp)
    x = torch.randn(lay.hidden, device="cuda")
    y = torch.empty(lay.inter, device="cuda")
    # correctness first: expert 0's gate and up against our dequantize (float32) @ x, the product
    # in float64 so that no TF32 setting can blur the reference
    rel = 0.0
    for off, nb in ((lay.gate_offset, lay.gate_bytes), (lay.up_offset, lay.up_bytes)):
        raw = prob.arena[0, off:off + nb]
        got = gpu.cuda_q4k_gemv(raw, x, lay.inter, lay.hidden, y).clone()
        ref = gpu.dequantize(raw, Q4_K, (lay.inter, lay.hidden), torch.float32).double() @ x.double()
        rel = max(rel, _rel_err(got, ref))

    def fn(r):
        a = prob.arena[r % prob.n_exp]
        gpu.cuda_q4k_gemv(a[lay.gate_offset:lay.gate_offset + lay.gate_bytes], x, lay.inter, lay.hidden, y)
        gpu.cuda_q4k_gemv(a[lay.up_offset:lay.up_offset + lay.up_bytes], x, lay.inter, lay.hidden, y)

    med, p20, p80 = _stats(_time_graph(fn, n_rot))
    gbs = 2 * lay.gate_bytes / (med * 1e-6) / 1e9
    rows.append({"name": "cuda_q4k_gemv", "shape": prob.name, "hidden": lay.hidden, "inter": lay.inter,
                 "tokens": 1, "what": "gate+up of one expert, 2 launches", "median_us": round(med, 2),
                 "p20_us": round(p20, 2), "p80_us": round(p80, 2), "gb_per_s": round(gbs, 1),
                 "frac_of_copy_bw": round(gbs / copy_gbs, 3), "rel_err_vs_dequant": rel,
                 "correct": rel <= GEMV_TOL})
    print(f"  {prob.name:14s} T=    1 cuda_q4k_gemv   {med:10.1f} us  {gbs:8.1f} GB/s "
          f"({gbs / copy_gbs:5.1%} of copy)  err {rel:.2e}", flush=True)


def tune(prob, copy_gbs, budget_s):
    """Sweep decode and prefill launch configs on one shape; return configs.json-style entries."""
    from dataclasses import replace

    from hybrimoe import gpu

    base = gpu.load_config(torch.cuda.get_device_name(), prob.layout.hidden, prob.layout.inter)
    t_end = time.time() + budget_s
    best = {}
    # decode: block_k a multiple of 256 (one-token Q4_K GEMV), block_n >= 16 (tl.dot for 2..16)
    decode = [gpu.LaunchConfig(1, bn, bk, w, s) for bn in (16, 32, 64) for bk in (256, 512)
              for w in (2, 4, 8) for s in (1, 2, 3)]
    prefill = [gpu.LaunchConfig(bm, bn, bk, w, s) for bm in (32, 64) for bn in (32, 64, 128)
               for bk in (32, 64) for w in (4, 8) for s in (2, 3)]
    for path, cands, t in (("decode", decode, 1), ("decode", decode, 16), ("prefill", prefill, 1024)):
        results = []
        for lc in cands:
            if time.time() > t_end:
                print("  tune: budget spent, stopping early")
                break
            cfg = replace(base, **{f"{path}_gate_up": lc, f"{path}_down": lc})
            rows = []
            try:
                bench_problem(prob, [t], copy_gbs, rows, config=cfg, variants=("triton_moe",))
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is skipped
                print(f"  tune: {lc} failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if rows and rows[0]["correct"]:
                results.append((rows[0]["median_us"], lc))
        if results:
            us, lc = min(results, key=lambda r: r[0])
            best[f"{path}_T{t}"] = (us, lc)
    fields = ("block_m", "block_n", "block_k", "num_warps", "num_stages")
    entry, measured = {}, {}
    for key, (us, lc) in best.items():
        measured[key] = {"median_us": us, **{f: getattr(lc, f) for f in fields}}
    # decode: the one-token winner (the commonest decode batch); prefill: the T=1024 winner
    for path, key in (("decode", "decode_T1"), ("prefill", "prefill_T1024")):
        if key in best:
            lc = best[key][1]
            cfg = {f: getattr(lc, f) for f in fields if f != "block_m" or path == "prefill"}
            entry[f"{path}_gate_up"] = dict(cfg)
            entry[f"{path}_down"] = dict(cfg)
    entry["_measured"] = measured
    return {f"{prob.layout.hidden}x{prob.layout.inter}": entry}


def run_gpu(args, save=lambda rows, best: None):
    """All GPU rows; save(rows, best) after copy_bw and after every shape (partial results)."""
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or L2_BYTES_FALLBACK
    print(f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB", flush=True)
    rows = []
    copy_gbs = copy_bandwidth_gbs()
    print(f"  copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows.append({"name": "copy_bw", "shape": "2GiB", "tokens": 0, "gb_per_s": round(copy_gbs, 1),
                 "frac_of_copy_bw": 1.0, "median_us": None})
    save(rows, None)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else list(SHAPES))
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    t_end = time.time() + args.budget_s
    best = None
    for name in shapes:
        if time.time() > t_end:
            print(f"budget of {args.budget_s}s spent: skipping {name} and later shapes")
            break
        prob = None
        try:
            prob = Problem(name, SHAPES[name], max(tokens), gen, l2)
            bench_problem(prob, tokens, copy_gbs, rows, t_end=t_end)
            bench_cuda_gemv(prob, copy_gbs, rows)
            if args.tune and best is None:
                best = tune(prob, copy_gbs, max(30.0, t_end - time.time()) / 2)
        except Exception as exc:  # noqa: BLE001 - record it, go on with the next shape
            import traceback

            traceback.print_exc()
            rows.append({"name": "error", "shape": name, "error": f"{type(exc).__name__}: {exc}"[:500],
                         "correct": False})
        finally:
            prob = None
            torch.cuda.empty_cache()
        # run_gpu.sh kills the script at its step timeout: the shapes done so far survive that
        save(rows, best)
    return props.name, rows, best


def run_cpu_quick():
    """No CUDA: one tiny case through the Triton interpreter, checked against the reference."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        print("triton_moe: no CUDA and no Triton: nothing to run")
        return "cpu", []
    from hybrimoe import gpu
    from hybrimoe.formats import Q4_K, Q6_K
    from hybrimoe.layout import ExpertLayout

    lay = ExpertLayout(256, 256, Q4_K, Q4_K, Q6_K)
    gen = torch.Generator().manual_seed(0)
    arena = gpu.random_arena(lay, 4, gen)
    slot = torch.tensor([0, 1, -1, 2, 3, -1], dtype=torch.int32)
    tiny = gpu.MoeConfig(decode_gate_up=gpu.LaunchConfig(1, 64, 256),
                         decode_down=gpu.LaunchConfig(1, 64, 256),
                         prefill_gate_up=gpu.LaunchConfig(16, 64, 128),
                         prefill_down=gpu.LaunchConfig(16, 64, 128), combine=gpu.LaunchConfig(block_n=256))
    rows = []
    for t in (1, 4):
        x = torch.randn(t, 256, generator=gen)
        ids = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(t)])
        wts = torch.rand(t, 2, generator=gen)
        got = gpu.moe_forward(x, ids, wts, slot, arena, lay, config=tiny)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            ref = gpu.moe_forward_ref(x, ids, wts, slot, arena, lay)
            times.append((time.perf_counter() - t0) * 1e6)
        rel = _rel_err(got, ref)
        med, p20, p80 = _stats(times)
        rows.append({"name": "reference_cpu", "shape": "tiny_256x256", "tokens": t,
                     "median_us": round(med, 1), "p20_us": round(p20, 1), "p80_us": round(p80, 1),
                     "x_vs_cublas_bf16": None, "frac_of_copy_bw": None,
                     "triton_interpreter_rel_err": rel, "correct": rel <= 1e-5})
        print(f"  tiny T={t}: interpreter vs reference rel err {rel:.2e}; reference {med:.0f} us")
    return "cpu (Triton interpreter; no GPU timings)", rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes/tokens; on CPU: tiny check")
    ap.add_argument("--tune", action="store_true", help="sweep launch configs (GPU)")
    ap.add_argument("--shapes", type=lambda s: s.split(","), help=f"subset of {list(SHAPES)}")
    ap.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new shapes after")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args(argv)
    for s in args.shapes or []:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; expected some of {list(SHAPES)}")

    def write(device, rows, best, partial):
        extra = {"best_configs": best} if best else {}
        if partial:
            extra["partial"] = True
        write_results("triton_moe", rows, args.json, device=device, **extra)

    best = None
    if torch.cuda.is_available():
        device, rows, best = run_gpu(args, save=lambda rows, best: write(None, rows, best, True))
    elif args.quick:
        device, rows = run_cpu_quick()
    else:
        print("triton_moe: no CUDA device; run with --quick for the CPU interpreter check")
        return 0
    write(device, rows, best, False)
    if args.json:
        print(f"wrote {args.json}")
    bad = [r for r in rows if r.get("correct") is False]
    if bad:
        print(f"INCORRECT results in {len(bad)} rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
