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
    x_vs_ggml       ggml_us / median_us (> 1: ours faster); ggml_8x8_us / x_vs_ggml_8x8: the repacked GEMV
    frac_of_read_bw our GB/s over a streaming read of the same bytes (cpu_kernels.py's ceiling)
    nmse_vs_ggml    ||ours - ggml||^2 / ||ggml||^2 (both quantize the activations to 8 bits)

For Q4_K it also times the GEMV llama.cpp itself runs on AVX2: the weights repacked 8 rows at a time
(`block_q4_Kx8`, repacked here in numpy from the layout of ggml's repack.cpp) through
`ggml_gemv_q4_K_8x8_q8_K` (ggml_8x8_us, x_vs_ggml_8x8); its output is checked against ggml's row
kernel first (nmse < 1e-6, else it is reported and not timed). Whole-model figures: vs_llamacpp.py. Without llama-cpp-python or a C compiler the script
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
typedef void (*gemv8_t)(int, float *, size_t, const void *, const void *, int, int);
/* ggml's repacked Q4_K GEMV (8 interleaved rows, block_q4_Kx8): the activation quantized once, one call */
void hm_gemv8(void *gemv, void *from_float, int rows, int cols, const void *w8, const float *x, void *xq, float *y) {
    ((from_float_t)from_float)(x, xq, cols);
    ((gemv8_t)gemv)(cols, y, rows, w8, xq, 1, rows);
}
/* y[r] = dot(row r of w, x) for every row: the activation quantized once, then ggml's vec_dot per row */
void hm_gemv(void *vec_dot, void *from_float, int rows, int cols, const unsigned char *w, size_t rb,
             const float *x, void *xq, float *y) {
    ((from_float_t)from_float)(x, xq, cols);
    for (int r = 0; r < rows; ++r) ((vec_dot_t)vec_dot)(cols, y + r, 0, w + (size_t)r * rb, 0, xq, 0, 1);
}
"""


def repack_q4_k_8x8(data: np.ndarray) -> np.ndarray:
    """Q4_K rows (rows, nb * 144) -> ggml's block_q4_Kx8 layout (rows / 8 groups x nb blocks of 1152
    bytes): per group of 8 rows and block column, the 8 d then the 8 dmin (fp16), 96 bytes of the 8
    rows' scales and mins re-packed 6-bit in ggml's order, then the quants 8 bytes from each row in
    turn. Written from the layout facts of ggml's repack.cpp (make_block_q4_Kx8, interleave 8)."""
    rows, rb = data.shape
    nb = rb // 144
    b = data.reshape(rows // 8, 8, nb, 144).transpose(0, 2, 1, 3)  # (group, block, row j, 144)
    out = np.empty((rows // 8, nb, 1152), np.uint8)
    out[..., 0:16] = b[..., 0:2].reshape(rows // 8, nb, 16)
    out[..., 16:32] = b[..., 2:4].reshape(rows // 8, nb, 16)
    sc = b[..., 4:16].astype(np.uint16)  # (g, x, j, 12)
    qs = b[..., 16:144].reshape(rows // 8, nb, 8, 16, 8)  # (g, x, row, chunk, byte)
    out[..., 128:] = qs.transpose(0, 1, 3, 2, 4).reshape(rows // 8, nb, 1024)

    def pack(s, m):  # s, m: (g, x, 8 rows) 6-bit -> 12 bytes
        o = np.empty(s.shape[:2] + (12,), np.uint16)
        o[..., 0:4] = (s[..., 0:4] & 63) + ((s[..., 4:8] & 48) << 2)
        o[..., 4:8] = (m[..., 0:4] & 63) + ((m[..., 4:8] & 48) << 2)
        o[..., 8:12] = (s[..., 4:8] & 15) + ((m[..., 4:8] & 15) << 4)
        return o.astype(np.uint8)

    for i in range(4):
        out[..., 32 + 12 * i:44 + 12 * i] = pack(sc[..., i] & 63, sc[..., i + 4] & 63)
        s2 = ((sc[..., i] & 192) >> 2) | (sc[..., i + 8] & 15)
        m2 = ((sc[..., i + 4] & 192) >> 2) | ((sc[..., i + 8] & 240) >> 4)
        out[..., 80 + 12 * i:92 + 12 * i] = pack(s2, m2)
    return out.reshape(rows // 8, nb * 1152)


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
    gemv8_fn = ctypes.cast(getattr(g, "ggml_gemv_q4_K_8x8_q8_K", None), ctypes.c_void_p).value \
        if hasattr(g, "ggml_gemv_q4_K_8x8_q8_K") else None
    shim.hm_gemv8.restype = None
    shim.hm_gemv8.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
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

    def gemv8(w8: np.ndarray, rows: int, cols: int, x: np.ndarray, y: np.ndarray) -> None:
        be, bb = ACT_BLOCK[Q.Q8_K]
        xq = bufs.get((be, cols))
        if xq is None:
            xq = bufs[(be, cols)] = np.zeros(cols // be * bb + 64, np.uint8)
        shim.hm_gemv8(gemv8_fn, traits[Q.Q4_K][1], rows, cols, w8.ctypes.data, x.ctypes.data, xq.ctypes.data,
                      y.ctypes.data)

    gemv.repacked = gemv8 if gemv8_fn else None
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
        # ggml's repacked Q4_K GEMV (what llama.cpp runs on AVX2), checked against its row kernel first
        w8s, nm8 = None, None
        if gemv is not None and gemv.repacked is not None and qtype == Q.Q4_K and rows % 8 == 0:
            w8s = [repack_q4_k_8x8(np.asarray(q.data)) for q in copies]
            y8 = np.empty(rows, np.float32)
            gemv.repacked(w8s[0], rows, cols, x, y8)
            nm8 = float(np.sum((y8.astype(np.float64) - y_g) ** 2) / np.sum(y_g.astype(np.float64) ** 2))
            if not nm8 < 1e-6:  # not the layout ggml reads: say so, time nothing
                print(f"# {name}: ggml's repacked GEMV disagrees with its row kernel (nmse {nm8:.2e}): not timed")
                w8s = None
        for cold in (True, False):
            ps, qs = (prepared, copies) if cold else (prepared[:1], copies[:1])
            med, _, _ = timeit([lambda p=p: cpu.gemm(p, xt, out=out) for p in ps], budget)
            g_med = None
            if gemv is not None:
                g_med, _, _ = timeit([lambda q=q: gemv(q, x, y_g) for q in qs], budget)
            g8 = None
            if w8s is not None:
                y8 = np.empty(rows, np.float32)
                g8, _, _ = timeit([lambda w=w: gemv.repacked(w, rows, cols, x, y8) for w in (w8s if cold else w8s[:1])],
                                  budget)
            gbps = base.nbytes / med / 1e3
            rbw = read_gbps(base.nbytes, 1, cold, budget / 2)
            row = dict(name=name, shape=[rows, cols], qtype=F.qtype_name(qtype), tokens=1, threads=1,
                       cache="cold" if cold else "hot", median_us=round(med, 2),
                       ggml_us=None if g_med is None else round(g_med, 2),
                       x_vs_ggml=None if g_med is None else round(g_med / med, 3),
                       gbps=round(gbps, 3), read_gbps=round(rbw, 3), frac_of_read_bw=round(gbps / rbw, 3),
                       nmse_vs_ggml=None if nm is None else float(f"{nm:.3g}"), weight_bytes=base.nbytes,
                       ggml_8x8_us=None if g8 is None else round(g8, 2),
                       x_vs_ggml_8x8=None if g8 is None else round(g8 / med, 3))
            rows_out.append(row)
            print(f"{name:26s} {row['qtype']:5s} {row['cache']:4s} ours {med:9.1f} us  ggml "
                  f"{'-' if g_med is None else f'{g_med:9.1f}'} us  x{row['x_vs_ggml']}  "
                  f"{row['frac_of_read_bw']:.2f} of read", flush=True)
    cpu.set_num_threads(cpu.physical_cores())
    print_table(rows_out, ["name", "qtype", "cache", "median_us", "ggml_us", "x_vs_ggml", "ggml_8x8_us",
                           "x_vs_ggml_8x8", "frac_of_read_bw", "nmse_vs_ggml"])
    write_results("vs_ggml", rows_out, args.json, quick=args.quick, ggml=ver if gemv is not None else None,
                  note=note, cpu_tier=cpu.tier())
    return 0


if __name__ == "__main__":
    sys.exit(main())
