"""Our CPU GEMV kernels against ggml's own, on the same bytes, one thread, one token.

ggml (llama.cpp's tensor library) exports its CPU dot products per quant type
(`ggml_get_type_traits_cpu(type)`: `from_float` for the activation type, `vec_dot` for one weight
row against one activation row). This script loads them from the llama-cpp-python wheel's
`libggml-cpu.so` (an optional benchmark dependency, never in CI: see vs_llamacpp.py), drives them over
every row of a matrix from a few lines of C compiled here (a Python loop would time ctypes, not the
kernel), and times them beside `hybrimoe.cpu.gemm` on the same raw GGUF blocks:

    name            shapes of DeepSeek-V2-Lite's expert / shared-expert matrices, Q4_K_M types
    cache           cold: copies rotated through > 2.5x the L3 (every call reads DRAM); hot: one copy
    median_us       ours; ggml_us: ggml's, both 1 thread, activations quantized inside the timed call
    x_vs_ggml       ggml_us / median_us (> 1: ours faster)
    frac_of_read_bw our GB/s over a streaming read of the same bytes (cpu_kernels.py's ceiling)
    nmse_vs_ggml    ||ours - ggml||^2 / ||ggml||^2 (both quantize the activations to 8 bits)

This is ggml's row-at-a-time kernel (`vec_dot`). llama.cpp's own inference on AVX2 repacks Q4_K
weights 8 rows at a time at load (its `q4_K_8x8` GEMV), which this script does not drive: its
whole-model figures are in vs_llamacpp.py. Without llama-cpp-python or a C compiler the script
writes our rows alone, with the reason, and every x_vs_ggml empty (never a guessed figure).

    python microbench/vs_ggml.py --json out.json [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402
from cpu_kernels import n_copies, read_gbps, timeit  # noqa: E402

from hybrimoe import cpu, synth  # noqa: E402
from hybrimoe import formats as F  # noqa: E402

Q = gguf.GGMLQuantizationType
# (name, rows, cols, weight type); ggml's activation type for each weight type
SHAPES = [("dsv2lite.gate", 1408, 2048, Q.Q4_K), ("dsv2lite.shared_down_q6k", 2048, 2816, Q.Q6_K),
          ("dsv2lite.down_q5_0", 2048, 1408, Q.Q5_0), ("dsv2lite.down_q8_0", 2048, 1408, Q.Q8_0),
          ("mixtral.gate", 14336, 4096, Q.Q4_K)]
ACT_TYPE = {Q.Q4_K: Q.Q8_K, Q.Q6_K: Q.Q8_K, Q.Q5_0: Q.Q8_0, Q.Q8_0: Q.Q8_0}
ACT_BLOCK = {Q.Q8_K: (256, 292), Q.Q8_0: (32, 34)}  # (elements, bytes) of ggml's block_q8_K / block_q8_0

_SHIM = r"""
#include <stddef.h>
#include <stdint.h>
typedef void (*vec_dot_t)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
typedef void (*from_float_t)(const float *, void *, int64_t);
/* y[r] = dot(row r of w, x) for every row: the activation quantized once, then ggml's vec_dot per row */
void hm_gemv(void *vec_dot, void *from_float, int rows, int cols, const unsigned char *w, size_t rb,
             const float *x, void *xq, float *y) {
    ((from_float_t)from_float)(x, xq, cols);
    for (int r = 0; r < rows; ++r) ((vec_dot_t)vec_dot)(cols, y + r, 0, w + (size_t)r * rb, 0, xq, 0, 1);
}
"""


class _Traits(ctypes.Structure):
    # struct ggml_type_traits_cpu (ggml-cpu.h): from_float, vec_dot, vec_dot_type, nrows
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


def load_ggml():
    """(gemv(qt, x (cols,) float32) -> (rows,) float32, version) or (None, reason)."""
    try:
        import llama_cpp
    except ImportError as e:
        return None, f"llama-cpp-python not installed ({e})"
    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    try:
        ctypes.CDLL(os.path.join(lib, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        g = ctypes.CDLL(os.path.join(lib, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return None, f"ggml's CPU library not loadable from {lib}: {e}"
    g.ggml_cpu_init.restype = None
    g.ggml_cpu_init()
    g.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
    g.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    traits = {}
    for wt, at in ACT_TYPE.items():
        t = g.ggml_get_type_traits_cpu(int(wt)).contents
        a = g.ggml_get_type_traits_cpu(int(at)).contents
        if t.vec_dot_type != int(at) or not t.vec_dot or not a.from_float:  # not the struct this script knows
            return None, (f"ggml's type traits for {F.qtype_name(wt)} are not the layout this script knows "
                          f"(vec_dot_type {t.vec_dot_type}, expected {int(at)})")
        traits[wt] = (t.vec_dot, a.from_float)
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler to build the row-loop shim"
    cache = os.path.join(os.path.expanduser("~"), ".cache", "hybrimoe")
    os.makedirs(cache, exist_ok=True)
    so = os.path.join(cache, f"ggml_shim_{hashlib.sha1(_SHIM.encode()).hexdigest()[:10]}.so")
    if not os.path.exists(so):
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "shim.c")
            with open(src, "w") as f:
                f.write(_SHIM)
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", src, "-o", so + ".tmp"], capture_output=True, text=True)
            if r.returncode:
                return None, f"building the shim failed: {r.stderr.strip()[:200]}"
            os.replace(so + ".tmp", so)
    shim = ctypes.CDLL(so)
    shim.hm_gemv.restype = None
    shim.hm_gemv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    bufs = {}

    def gemv(qt, x: np.ndarray, y: np.ndarray) -> None:
        rows, cols = qt.shape
        vd, ff = traits[int(qt.qtype)]
        be, bb = ACT_BLOCK[ACT_TYPE[Q(int(qt.qtype))]]
        xq = bufs.get((be, cols))
        if xq is None:
            xq = bufs[(be, cols)] = np.zeros(cols // be * bb + 64, np.uint8)
        shim.hm_gemv(vd, ff, rows, cols, qt.data.ctypes.data, qt.data.strides[0], x.ctypes.data, xq.ctypes.data,
                     y.ctypes.data)

    return gemv, getattr(llama_cpp, "__version__", "?")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="two shapes, short timing (< 1 minute)")
    args = ap.parse_args(argv)
    gemv, ver = load_ggml()
    note = None if gemv is not None else ver
    if note:
        print(f"# ggml not measured: {note}")
    shapes = SHAPES[:2] if args.quick else SHAPES
    budget = 0.2 if args.quick else 1.0
    rng = np.random.default_rng(0)
    cpu.set_num_threads(1)
    torch.set_num_threads(1)
    rows_out = []
    for name, rows, cols, qtype in shapes:
        base = F.QuantTensor(synth.random_blocks(qtype, rows, cols, 0.02, rng), qtype, (rows, cols))
        copies = [base] + [F.QuantTensor(base.data.copy(), qtype, (rows, cols))
                           for _ in range(n_copies(base.nbytes, True) - 1)]
        prepared = [cpu.PreparedWeight(q, name) for q in copies]
        x = rng.standard_normal(cols).astype(np.float32)
        xt = torch.from_numpy(x).reshape(1, cols)
        out = torch.empty(1, rows)
        y_g = np.empty(rows, np.float32)
        nm = None
        if gemv is not None:
            gemv(base, x, y_g)
            ours = cpu.gemm(prepared[0], xt).numpy().ravel()
            nm = float(np.sum((ours.astype(np.float64) - y_g) ** 2) / np.sum(y_g.astype(np.float64) ** 2))
        for cold in (True, False):
            ps, qs = (prepared, copies) if cold else (prepared[:1], copies[:1])
            med, _, _ = timeit([lambda p=p: cpu.gemm(p, xt, out=out) for p in ps], budget)
            g_med = None
            if gemv is not None:
                g_med, _, _ = timeit([lambda q=q: gemv(q, x, y_g) for q in qs], budget)
            gbps = base.nbytes / med / 1e3
            rbw = read_gbps(base.nbytes, 1, cold, budget / 2)
            row = dict(name=name, shape=[rows, cols], qtype=F.qtype_name(qtype), tokens=1, threads=1,
                       cache="cold" if cold else "hot", median_us=round(med, 2),
                       ggml_us=None if g_med is None else round(g_med, 2),
                       x_vs_ggml=None if g_med is None else round(g_med / med, 3),
                       gbps=round(gbps, 3), read_gbps=round(rbw, 3), frac_of_read_bw=round(gbps / rbw, 3),
                       nmse_vs_ggml=None if nm is None else float(f"{nm:.3g}"), weight_bytes=base.nbytes)
            rows_out.append(row)
            print(f"{name:26s} {row['qtype']:5s} {row['cache']:4s} ours {med:9.1f} us  ggml "
                  f"{'-' if g_med is None else f'{g_med:9.1f}'} us  x{row['x_vs_ggml']}  "
                  f"{row['frac_of_read_bw']:.2f} of read", flush=True)
    cpu.set_num_threads(cpu.physical_cores())
    print_table(rows_out, ["name", "qtype", "cache", "median_us", "ggml_us", "x_vs_ggml", "frac_of_read_bw",
                           "nmse_vs_ggml"])
    write_results("vs_ggml", rows_out, args.json, quick=args.quick, ggml=ver if gemv is not None else None,
                  note=note, cpu_tier=cpu.tier())
    return 0


if __name__ == "__main__":
    sys.exit(main())
