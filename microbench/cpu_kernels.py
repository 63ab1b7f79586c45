"""Microbenchmark of the CPU expert kernels (hybrimoe.cpu) against what a user would otherwise run.

For each weight shape x token count x thread count x cache state it reports:
    median_us (p10/p90 spread), gbps        quantized weight bytes read per second
    x_vs_torch_fp32                        torch fp32 matmul on the dequantized weights, same run,
                                           same threads, same cache state, divided by ours
    frac_of_copy_bw                        gbps / the bandwidth (bytes read) of a memcpy of the
                                           same byte count on the same threads, same cache state
                                           (its peak: the 10th-percentile time); a memcpy also
                                           writes every byte, so a read-only kernel can exceed 1
    frac_of_read_bw                        gbps / a streaming read (a sum over the same byte count,
                                           same threads, same cache state, its peak): the ceiling
                                           of a kernel that reads its weights once, <= 1 up to noise
cold: weights rotated through copies totalling > 2.5x the L3 (every call reads DRAM); hot: one
copy, called repeatedly (stays in L2/L3 where it fits). Correctness is checked before timing.

Extra rows:
    act=f32 rows    Q4_K with float activations (no int8 quantization; the alternative the
                    integer path was chosen over), same shapes
    moe_ffn rows    one fused call for a DSv2-Lite layer's routed experts vs the torch loop

Usage: python microbench/cpu_kernels.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from hybrimoe import cpu, formats as F, synth
from hybrimoe.costs import cpu_model, l3_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

# name -> (rows, cols, qtype): y = x @ W.T with W (rows, cols)
SHAPES = {
    "dsv2lite.gate": (1408, 2048, F.Q4_K),
    "dsv2lite.down_q5_0": (2048, 1408, F.Q5_0),
    "dsv2lite.down_q8_0": (2048, 1408, F.Q8_0),
    "qwen3_30b_a3b.gate": (768, 2048, F.Q4_K),
    "mixtral.gate": (14336, 4096, F.Q4_K),
    "mixtral.down_q6k": (4096, 14336, F.Q6_K),
}
QUICK_SHAPES = ["dsv2lite.gate", "dsv2lite.down_q5_0", "qwen3_30b_a3b.gate"]
TOKENS = [1, 4, 16, 64, 512]
QUICK_TOKENS = [1, 16, 64]
COLD_MAX_TOKENS = 16  # beyond this the kernels are compute-bound: hot only
NMSE_CHECK = 5e-4  # tests/test_cpu_kernels.py NMSE_INT8_ACT


def device_name() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cpus, L3 {l3_bytes() >> 20} MiB, tier {cpu.tier()}"


def timeit(calls, budget_s: float, min_reps: int = 5, max_reps: int = 400):
    """Median/p10/p90 in microseconds of calls[i % len(calls)](), after one warm-up round."""
    for c in calls:
        c()
    ts = []
    t_end = time.perf_counter() + budget_s
    i = 0
    while len(ts) < min_reps or (time.perf_counter() < t_end and len(ts) < max_reps):
        c = calls[i % len(calls)]
        t0 = time.perf_counter_ns()
        c()
        ts.append((time.perf_counter_ns() - t0) / 1e3)
        i += 1
    ts = np.array(ts)
    return float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90))


def n_copies(nbytes: int, cold: bool) -> int:
    return max(1, math.ceil(2.5 * l3_bytes() / nbytes)) if cold else 1


_COPY_CACHE: dict = {}


def copy_gbps(nbytes: int, threads: int, cold: bool, budget: float) -> float:
    """Bytes read per second of a plain memcpy of nbytes, split over `threads` threads of the
    kernels' own pool (torch's copy_ under OpenMP stalls badly when other processes share the
    cores). Peak = 10th-percentile time."""
    key = (nbytes, threads, cold)
    if key not in _COPY_CACHE:
        cpu.set_num_threads(threads)
        k = n_copies(2 * nbytes, cold)
        bufs = [(np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)) for _ in range(k)]
        memcpy = cpu._ext()._memcpy
        _, p10, _ = timeit([lambda s=s, d=d: memcpy(d.ctypes.data, s.ctypes.data, nbytes) for s, d in bufs], budget,
                           min_reps=10)
        _COPY_CACHE[key] = nbytes / p10 / 1e3
    return _COPY_CACHE[key]


_READ_CACHE: dict = {}


def read_gbps(nbytes: int, threads: int, cold: bool, budget: float) -> float:
    """Bytes per second of a streaming read (a sum) over nbytes, split over `threads` threads of
    the kernels' own pool like copy_gbps; cold: rotated through buffers totalling > 2.5x the L3.
    Peak = 10th-percentile time."""
    nbytes = max(128, nbytes // 128 * 128)
    key = (nbytes, threads, cold)
    if key not in _READ_CACHE:
        cpu.set_num_threads(threads)
        bufs = [np.ones(nbytes, np.uint8) for _ in range(n_copies(nbytes, cold))]
        rsum = cpu._ext()._read_sum
        _, p10, _ = timeit([lambda b=b: rsum(b.ctypes.data, nbytes) for b in bufs], budget, min_reps=10)
        _READ_CACHE[key] = nbytes / p10 / 1e3
    return _READ_CACHE[key]


def nmse(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((y - ref) ** 2) / np.sum(ref**2))


def bench_shape(name, rows, cols, qtype, tokens, threads_list, budget, rng, rows_out, f32act: bool):
    base = F.QuantTensor(synth.random_blocks(qtype, rows, cols, 0.02, rng), qtype, (rows, cols))
    wbytes = base.nbytes
    deq = torch.from_numpy(base.dequantize())
    k_cold = n_copies(wbytes, True)
    qcopies = [base] + [F.QuantTensor(base.data.copy(), qtype, (rows, cols)) for _ in range(k_cold - 1)]
    tcopies = [deq] + [deq.clone() for _ in range(n_copies(deq.numel() * 4, True) - 1)]
    # correctness first
    xc = torch.randn(4, cols)
    err = nmse(cpu.gemm(base, xc), xc @ deq.T)
    if not err < NMSE_CHECK:
        raise RuntimeError(f"{name}: kernel disagrees with torch (NMSE {err:.2e})")
    for T in tokens:
        x = torch.randn(T, cols)
        out = torch.empty(T, rows)
        for threads in threads_list:
            cpu.set_num_threads(threads)
            for cold in ([True, False] if T <= COLD_MAX_TOKENS else [False]):
                qs = qcopies if cold else qcopies[:1]
                ts = tcopies if cold else tcopies[:1]
                med, p10, p90 = timeit([lambda q=q: cpu.gemm(q, x, out=out) for q in qs], budget)
                torch.set_num_threads(threads)
                tmed, _, _ = timeit([lambda w=w: torch.matmul(x, w.T) for w in ts], budget)
                gbps = wbytes / med / 1e3
                cbw = copy_gbps(wbytes, threads, cold, budget / 2)
                rbw = read_gbps(wbytes, threads, cold, budget / 2)
                row = dict(name=name, shape=[rows, cols], qtype=F.qtype_name(qtype), act="q8", tokens=T,
                           median_us=round(med, 2), p10_us=round(p10, 2), p90_us=round(p90, 2),
                           torch_fp32_us=round(tmed, 2), x_vs_torch_fp32=round(tmed / med, 3),
                           gbps=round(gbps, 3), copy_gbps=round(cbw, 3), frac_of_copy_bw=round(gbps / cbw, 3),
                           read_gbps=round(rbw, 3), frac_of_read_bw=round(gbps / rbw, 3),
                           threads=threads, cache="cold" if cold else "hot", weight_bytes=wbytes)
                rows_out.append(row)
                print(f"{name:22s} {F.qtype_name(qtype):5s} T={T:<4d} th={threads} {row['cache']:4s} "
                      f"{med:9.1f} us  {gbps:6.2f} GB/s  {gbps / cbw:5.2f} of copy  {gbps / rbw:5.2f} of read  "
                      f"x{tmed / med:6.2f} vs torch fp32", flush=True)
                if f32act and qtype == F.Q4_K and T == 1 and cpu.tier() == "avx512":  # an AVX-512-only probe
                    ext = cpu._ext()
                    xn = x.numpy()
                    fmed, fp10, fp90 = timeit(
                        [lambda q=q: ext._gemm_q4k_f32act(q.data.ctypes.data, rows, cols, xn.ctypes.data, T,
                                                          out.data_ptr()) for q in qs], budget)
                    fg = wbytes / fmed / 1e3
                    rows_out.append(dict(row, act="f32", median_us=round(fmed, 2), p10_us=round(fp10, 2),
                                         p90_us=round(fp90, 2), x_vs_torch_fp32=round(tmed / fmed, 3),
                                         gbps=round(fg, 3), frac_of_copy_bw=round(fg / cbw, 3),
                                         frac_of_read_bw=round(fg / rbw, 3)))
                    print(f"{'  (act=f32)':22s} {'':5s} {'':6s} {'':4s} {'':4s} {fmed:9.1f} us  {fg:6.2f} GB/s  "
                          f"{fg / cbw:5.2f} of copy  (int8 path x{fmed / med:.2f} faster)", flush=True)


def bench_moe(tokens, threads_list, budget, rng, rows_out):
    """DSv2-Lite routed experts of one layer: 64 experts, top-6, Q4_K gate/up, Q5_0 down."""
    from hybrimoe.reference import expert_ffn

    H, I, K = 2048, 1408, 6  # a 64-expert layer; only `used` of them are materialised
    used = 12  # experts materialised; tokens are routed among them
    ex = [(F.QuantTensor(synth.random_blocks(F.Q4_K, I, H, 0.02, rng), F.Q4_K, (I, H)),
           F.QuantTensor(synth.random_blocks(F.Q4_K, I, H, 0.02, rng), F.Q4_K, (I, H)),
           F.QuantTensor(synth.random_blocks(F.Q5_0, H, I, 0.02, rng), F.Q5_0, (H, I))) for _ in range(used)]
    deq = [tuple(torch.from_numpy(m.dequantize()) for m in e) for e in ex]
    for T in tokens:
        ids = np.stack([rng.choice(used, K, replace=False) for _ in range(T)])
        toks = [np.nonzero((ids == e).any(1))[0].astype(np.int32) for e in range(used)]
        wts = [np.full(len(t), 1.0 / K, np.float32) for t in toks]
        active = [e for e in range(used) if len(toks[e])]
        wbytes = sum(ex[e][0].nbytes + ex[e][1].nbytes + ex[e][2].nbytes for e in active)
        x = torch.randn(T, H)
        err = nmse(cpu.moe_ffn(x, ex, toks, wts), cpu.moe_ffn_ref(x, ex, toks, wts))
        if not err < 3e-3:  # tests/test_cpu_kernels.py NMSE_INT8_FFN
            raise RuntimeError(f"moe_ffn disagrees with the reference (NMSE {err:.2e})")

        def torch_loop():
            out = torch.zeros(T, H)
            for e in active:
                t = torch.from_numpy(toks[e]).long()
                out.index_add_(0, t, expert_ffn(x[t], *deq[e]) / K)
            return out

        for threads in threads_list:
            cpu.set_num_threads(threads)
            torch.set_num_threads(threads)
            med, p10, p90 = timeit([lambda: cpu.moe_ffn(x, ex, toks, wts)], budget)
            tmed, _, _ = timeit([torch_loop], budget)
            gbps = wbytes / med / 1e3
            cbw = copy_gbps(wbytes, threads, False, budget / 2)
            rbw = read_gbps(wbytes, threads, False, budget / 2)
            rows_out.append(dict(name=f"moe_ffn.dsv2lite.top{K}", shape=[H, I], qtype="Q4_K/Q4_K/Q5_0", act="q8",
                                 tokens=T, median_us=round(med, 2), p10_us=round(p10, 2), p90_us=round(p90, 2),
                                 torch_fp32_us=round(tmed, 2), x_vs_torch_fp32=round(tmed / med, 3),
                                 gbps=round(gbps, 3), copy_gbps=round(cbw, 3), frac_of_copy_bw=round(gbps / cbw, 3),
                                 read_gbps=round(rbw, 3), frac_of_read_bw=round(gbps / rbw, 3),
                                 threads=threads, cache="hot", weight_bytes=wbytes, experts=len(active)))
            print(f"{'moe_ffn dsv2lite top6':22s} {len(active):2d} ex T={T:<4d} th={threads} hot  {med:9.1f} us  "
                  f"{gbps:6.2f} GB/s  {gbps / cbw:5.2f} of copy  {gbps / rbw:5.2f} of read  x{tmed / med:6.2f} vs torch fp32 loop", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset, under a minute")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, nargs="*", help="thread counts (default 1..physical cores)")
    args = ap.parse_args(argv)
    if not cpu.available():
        sys.exit("hybrimoe._cpu is not built: pip install --no-build-isolation -e .")
    n_phys = cpu.num_threads()
    threads_list = args.threads or list(range(1, n_phys + 1))
    rng = np.random.default_rng()
    budget = 0.15 if args.quick else 0.5
    shapes = QUICK_SHAPES if args.quick else list(SHAPES)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    print(f"# {device_name()}; threads {threads_list}; load average {os.getloadavg()}", flush=True)
    rows: list[dict] = []
    t0 = time.time()
    for name in shapes:
        bench_shape(name, *SHAPES[name], tokens, threads_list, budget, rng, rows, f32act=True)
    bench_moe([1, 16] if args.quick else [1, 16, 128], threads_list, budget, rng, rows)
    cpu.set_num_threads(n_phys)
    seconds = round(time.time() - t0, 1)
    print(f"# {len(rows)} rows in {seconds} s", flush=True)
    result = write_results("cpu_kernels", rows, args.json, device=device_name(), quick=args.quick,
                           load_average_at_start=os.getloadavg(), seconds=seconds)
    return result


if __name__ == "__main__":
    main()
