"""Quantized expert formats of Q4_K_M GGUF files: Q4_K, Q6_K and the fallbacks Q5_0, Q8_0.

The block layouts are defined here once for Python (numpy structured dtypes) and once for C++ in
kernels/cpu/blocks.h (same field names, `static_assert` on the sizes). Everything is numpy and
vectorised; these functions are the readable references every kernel is tested against.

Public API (stable; other modules and kernels rely on it):
    Q4_K, Q6_K, Q5_0, Q8_0                  GGML type ids (ints, == gguf.GGMLQuantizationType)
    EXPERT_QTYPES                           the four expert types
    BLOCK_DTYPES[qtype]                     numpy structured dtype of one block
    block_elems(qtype), block_bytes(qtype)  elements / bytes per block
    row_bytes(qtype, cols)                  bytes of one quantized row (raises QuantShapeError)
    QuantTensor                             raw blocks (rows, row_bytes) uint8 + qtype + (rows, cols)
    dequantize(raw, qtype, shape)           -> float32, bit-identical to gguf.quants.dequantize
    quantize(x, qtype)                      float32 (rows, cols) -> uint8 (rows, row_bytes)
    q4_k_m_type(...)                        the type llama.cpp's Q4_K_M recipe gives a tensor
    unpack_q4k_scales(scales_bytes)         Q4_K 12 packed bytes -> (sc, m) uint8 (..., 8)
    sqnr_db(x, y)                           signal-to-quantization-noise ratio in dB
    F32, F16                                GGML type ids of the unquantized types q4_k_m_type returns
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as _T

from .errors import ModelConfigError, QuantShapeError, UnsupportedQuantError

Q4_K = int(_T.Q4_K)
Q6_K = int(_T.Q6_K)
Q5_0 = int(_T.Q5_0)
Q8_0 = int(_T.Q8_0)
EXPERT_QTYPES = (Q4_K, Q6_K, Q5_0, Q8_0)
QK_K = 256

# One block of each type, GGUF byte layout (little-endian; fp16 scales kept as raw uint16 bits).
BLOCK_DTYPES = {
    Q4_K: np.dtype([("d", "<u2"), ("dmin", "<u2"), ("scales", "u1", 12), ("qs", "u1", 128)]),
    Q6_K: np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<u2")]),
    Q5_0: np.dtype([("d", "<u2"), ("qh", "u1", 4), ("qs", "u1", 16)]),
    Q8_0: np.dtype([("d", "<u2"), ("qs", "i1", 32)]),
}
_BLOCK_ELEMS = {Q4_K: 256, Q6_K: 256, Q5_0: 32, Q8_0: 32}
assert {t: d.itemsize for t, d in BLOCK_DTYPES.items()} == {Q4_K: 144, Q6_K: 210, Q5_0: 22, Q8_0: 34}


def qtype_name(qtype: int) -> str:
    try:
        return _T(int(qtype)).name
    except ValueError:
        return f"unknown({qtype})"


def _check(qtype: int) -> int:
    qtype = int(qtype)
    if qtype not in BLOCK_DTYPES:
        raise UnsupportedQuantError(
            f"quant type {qtype_name(qtype)} is not an expert format here "
            f"(expected one of {[qtype_name(t) for t in EXPERT_QTYPES]})"
        )
    return qtype


def block_elems(qtype: int) -> int:
    return _BLOCK_ELEMS[_check(qtype)]


def block_bytes(qtype: int) -> int:
    return BLOCK_DTYPES[_check(qtype)].itemsize


def row_bytes(qtype: int, cols: int, name: str | None = None) -> int:
    """Bytes of one row of `cols` weights in `qtype`; raises QuantShapeError if cols is not a
    multiple of the block size."""
    be = block_elems(qtype)
    if cols <= 0 or cols % be:
        where = f"{name}: " if name else ""
        raise QuantShapeError(
            f"{where}row length {cols} is not a positive multiple of {qtype_name(qtype)}'s block size {be}"
        )
    return cols // be * block_bytes(qtype)


@dataclass(frozen=True)
class QuantTensor:
    """A 2-D quantized weight matrix as raw GGUF blocks.

    data:  uint8 (rows, row_bytes), C-contiguous rows (a zero-copy view into the GGUF mmap or a
           pinned arena); row r holds weights W[r, :] for y = x @ W.T
    qtype: GGML type id (Q4_K, Q6_K, Q5_0, Q8_0)
    shape: (rows, cols) of the float matrix it stands for
    """

    data: np.ndarray
    qtype: int
    shape: tuple[int, int]

    def __post_init__(self):
        rows, cols = self.shape
        rb = row_bytes(self.qtype, cols)
        if self.data.dtype != np.uint8 or self.data.shape != (rows, rb):
            raise QuantShapeError(
                f"QuantTensor {qtype_name(self.qtype)} {self.shape}: raw data must be uint8 "
                f"({rows}, {rb}), found {self.data.dtype} {self.data.shape}"
            )

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.data, self.qtype, self.shape)


# ----------------------------------------------------------------------------------------------
# small float32 helpers that mirror what ggml's C code does bit for bit
# ----------------------------------------------------------------------------------------------

_F32 = np.float32
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int(): float32 add of 1.5*2**23, then read the low 23 mantissa bits.

    Rounds half to even for |v| < 2**22 and reproduces the C result (garbage included) outside it."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.asarray(v, dtype=_F32) + _MAGIC
    return (s.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _to_fp16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even, returned as raw uint16 bits."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(v, dtype=_F32).astype(np.float16).view(np.uint16)


def _fp16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(_F32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0 (the C loops `s = 0; s += t[i]`), vectorised over the
    other axes. numpy's own reductions are pairwise and would round differently."""
    acc = np.zeros(terms.shape[1:], dtype=_F32)
    for t in terms:
        acc = acc + t
    return acc


# ----------------------------------------------------------------------------------------------
# dequantization
# ----------------------------------------------------------------------------------------------


def unpack_q4k_scales(scales_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 packed bytes of a Q4_K block into 8 six-bit scales and 8 six-bit mins.

    scales_bytes: uint8 (..., 12). Returns (sc, m), each uint8 (..., 8). Layout (llama.cpp
    get_scale_min_k4): for j < 4, sc[j] = b[j] & 63 and m[j] = b[j+4] & 63; for j >= 4 the low four
    bits come from b[j+4] (sc in the low nibble, m in the high one) and the top two bits from the
    spare top bits of b[j-4] (sc) and b[j] (m).
    """
    b = np.asarray(scales_bytes, dtype=np.uint8)
    if b.shape[-1:] != (12,):
        raise QuantShapeError(f"Q4_K scales must have 12 bytes on the last axis, found shape {b.shape}")
    lo, mid, hi = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc.astype(np.uint8), m.astype(np.uint8)


def _pack_q4k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Inverse of unpack_q4k_scales for values already clamped to 0..63: (..., 8) x2 -> (..., 12)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty(ls.shape[:-1] + (12,), dtype=np.uint8)
    out[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    out[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (ls[..., 4:8] & 0x0F) | ((lm[..., 4:8] & 0x0F) << 4)
    return out


def _blocks(raw: np.ndarray, qtype: int, shape) -> tuple[np.ndarray, tuple[int, ...]]:
    qtype = _check(qtype)
    shape = tuple(int(s) for s in (shape if np.ndim(shape) else (shape,)))
    if not shape or any(s < 0 for s in shape):
        raise QuantShapeError(f"{qtype_name(qtype)}: bad shape {shape}")
    rb = row_bytes(qtype, shape[-1])
    nrows = int(np.prod(shape[:-1], dtype=np.int64))
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise QuantShapeError(f"{qtype_name(qtype)}: raw data must be uint8, found {raw.dtype}")
    if raw.size != nrows * rb:
        raise QuantShapeError(
            f"{qtype_name(qtype)} {shape}: raw buffer must hold {nrows} x {rb} = {nrows * rb} bytes, "
            f"found {raw.size} (shape {raw.shape})"
        )
    flat = np.ascontiguousarray(raw).reshape(-1)
    return flat.view(BLOCK_DTYPES[qtype]), shape


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    d = _fp16_bits_to_f32(b["d"])[:, None]
    dmin = _fp16_bits_to_f32(b["dmin"])[:, None]
    sc, m = unpack_q4k_scales(b["scales"])
    dl = (d * sc.astype(_F32))[:, :, None]  # (nb, 8, 1)
    ml = (dmin * m.astype(_F32))[:, :, None]
    qs = b["qs"].reshape(-1, 4, 1, 32)  # 32 bytes per pair of sub-blocks: low nibbles, then high
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(_F32)
    return (dl * q - ml).reshape(-1, 256)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    d = _fp16_bits_to_f32(b["d"])[:, None]
    dl = (d * b["scales"].astype(_F32))[:, :, None]  # (nb, 16, 1)
    ql = b["ql"].reshape(-1, 2, 1, 64)  # per 128-half: ql[0:32], ql[32:64]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # quarter k: +32k
    qh = b["qh"].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (low | ((qh & 3) << 4)).astype(np.int8) - np.int8(32)
    return (dl * q.reshape(-1, 16, 16).astype(_F32)).reshape(-1, 256)


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    d = _fp16_bits_to_f32(b["d"])[:, None]
    qh = np.ascontiguousarray(b["qh"]).view("<u4").reshape(-1, 1)
    hbit = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    qs = b["qs"]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    q = (low | (hbit << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(_F32)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return b["qs"].astype(_F32) * _fp16_bits_to_f32(b["d"])[:, None]


_DEQ = {Q4_K: _deq_q4_k, Q6_K: _deq_q6_k, Q5_0: _deq_q5_0, Q8_0: _deq_q8_0}


def dequantize(raw: np.ndarray, qtype: int, shape) -> np.ndarray:
    """Decode raw GGUF blocks to float32 of `shape` (last axis = row length).

    raw: uint8 of any shape whose bytes are the rows back to back. Raises UnsupportedQuantError
    for other types and QuantShapeError when the row length or the buffer size does not fit.
    Bit-identical to gguf.quants.dequantize (same float32 operation order).
    """
    blocks, shape = _blocks(raw, qtype, shape)
    if blocks.size == 0:
        return np.zeros(shape, dtype=_F32)
    with np.errstate(over="ignore", invalid="ignore"):
        return _DEQ[int(qtype)](blocks).reshape(shape)


# ----------------------------------------------------------------------------------------------
# quantization (llama.cpp reference quantizers, no importance matrix)
# ----------------------------------------------------------------------------------------------


def _make_qkx2_quants(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad=false) for all sub-blocks at once.

    X, W: float32 (n, S): element i of sub-block s at [i, s]. Returns (scale, the_min, L) with
    scale, the_min float32 (S,) and L int32 (n, S); the same float32 operations in the same order as
    the C code, so the chosen levels match bit for bit.
    """
    f_nmax = _F32(nmax)
    mn = X.min(axis=0)
    mx = X.max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sum_w = W[0].copy()
        sum_x = sum_w * X[0]
        for i in range(1, X.shape[0]):
            sum_w = sum_w + W[i]
            sum_x = sum_x + W[i] * X[i]
        mn = np.where(mn > 0, _F32(0), mn)
        flat = mx == mn  # constant sub-block: L = 0, scale 0, the_min = -min
        live = ~flat
        iscale = f_nmax / (mx - mn)
        scale = _F32(1) / iscale
        L = np.clip(_nearest_int(iscale * (X - mn)), 0, nmax)
        diff = (scale * L.astype(_F32) + mn) - X
        best = _seq_sum(W * (diff * diff))
        for step in range(nstep + 1):
            iscale = ((_F32(rmin) + _F32(rdelta) * _F32(step)) + f_nmax) / (mx - mn)
            La = np.clip(_nearest_int(iscale * (X - mn)), 0, nmax)
            Lf = La.astype(_F32)
            wl = W * Lf
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(wl * Lf)
            sum_xl = _seq_sum(wl * X)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = (this_scale * Lf + this_min) - X
            cur = _seq_sum(W * (diff * diff))
            take = live & (D > 0) & (cur < best)
            L = np.where(take, La, L)
            best = np.where(take, cur, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, _F32(0), scale).astype(_F32)
    return scale, (-mn).astype(_F32), L


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref: x float32 (rows, cols), cols % 256 == 0 -> blocks (nb,)."""
    nb = x.size // 256
    X = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, S): sub-blocks of 32
    with np.errstate(over="ignore", invalid="ignore"):
        sum_x2 = _seq_sum(X * X)
        av_x = np.sqrt(sum_x2 / _F32(32))
        W = av_x + np.abs(X)
    scales, mins, L = _make_qkx2_quants(X, W, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.T.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        max_scale = np.maximum(scales.max(axis=1), _F32(0))
        max_min = np.maximum(mins.max(axis=1), _F32(0))
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))[:, None]
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))[:, None]
        ls = np.minimum(_nearest_int(inv_scale * scales) & 0xFF, 63)  # C: uint8_t, then MIN(63, .)
        lm = np.minimum(_nearest_int(inv_min * mins) & 0xFF, 63)
        out = np.zeros(nb, dtype=BLOCK_DTYPES[Q4_K])
        out["scales"] = _pack_q4k_scales(ls, lm)
        out["d"] = _to_fp16_bits(max_scale / _F32(63))
        out["dmin"] = _to_fp16_bits(max_min / _F32(63))
        sc, m = unpack_q4k_scales(out["scales"])
        d = (_fp16_bits_to_f32(out["d"])[:, None] * sc.astype(_F32))[:, :, None]
        dm = (_fp16_bits_to_f32(out["dmin"])[:, None] * m.astype(_F32))[:, :, None]
        xs = x.reshape(nb, 8, 32)
        Lr = np.clip(_nearest_int((xs + dm) / d), 0, 15)
    L = np.where(d != 0, Lr, L).astype(np.uint8)  # d == 0: keep make_qkx2_quants' levels
    L = L.reshape(nb, 4, 2, 32)
    out["qs"] = (L[:, :, 0, :] | (L[:, :, 1, :] << 4)).reshape(nb, 128)
    return out


def _make_qx_quants_rmse1(X: np.ndarray, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for all sub-blocks at once.

    X float32 (n, S). Returns (scale float32 (S,), L int32 (n, S) in 0..2*nmax-1)."""
    ax = np.abs(X)
    imax = np.argmax(ax, axis=0)  # first index of the largest |x|, as the C loop's strict '>'
    cols = np.arange(X.shape[1])
    amax = ax[imax, cols]
    vmax = X[imax, cols]
    zero = amax < _F32(1e-15)
    W = X * X
    f_nmax = _F32(nmax)

    def sums(iscale):
        l = np.clip(_nearest_int(iscale * X), -nmax, nmax - 1)
        lf = l.astype(_F32)
        return l, _seq_sum((W * X) * lf), _seq_sum((W * lf) * lf)

    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        l, sumlx, suml2 = sums(-f_nmax / vmax)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(f_nmax + _F32(0.1) * _F32(step)) / vmax
            l2, sumlx, suml2 = sums(iscale)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            l = np.where(take, l2, l)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    L = np.where(zero, 0, l + nmax)
    scale = np.where(zero, _F32(0), scale).astype(_F32)
    return scale, L


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref: x float32 (rows, cols), cols % 256 == 0 -> blocks (nb,)."""
    nb = x.size // 256
    X = np.ascontiguousarray(x.reshape(nb * 16, 16).T)  # (16, S): sub-blocks of 16
    scales, L = _make_qx_quants_rmse1(X, nmax=32)
    scales = scales.reshape(nb, 16)
    L = L.T.reshape(nb, 16, 16)
    ia = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(nb), ia]
    zero = np.abs(max_scale) < _F32(1e-15)
    out = np.zeros(nb, dtype=BLOCK_DTYPES[Q6_K])
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        iscale = np.where(zero, _F32(1), _F32(-128) / max_scale)
        out["d"] = np.where(zero, np.uint16(0), _to_fp16_bits(_F32(1) / iscale))
        sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
        sc = np.where(zero[:, None], 0, sc)
        out["scales"] = (sc & 0xFF).astype(np.uint8).view(np.int8)
        d = (_fp16_bits_to_f32(out["d"])[:, None] * out["scales"].astype(_F32))[:, :, None]
        Lr = np.clip(_nearest_int(x.reshape(nb, 16, 16) / d), -32, 31) + 32
    L = np.where(d != 0, Lr, L)
    L = np.where(zero[:, None, None], 0, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # quarter k: +32k
    ql = (L[:, :, 0:2, :] & 0x0F) | ((L[:, :, 2:4, :] & 0x0F) << 4)  # (nb, 2, 2, 32)
    out["ql"] = ql.reshape(nb, 128)
    qh = (L >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    out["qh"] = np.bitwise_or.reduce(qh, axis=2).reshape(nb, 64)
    return out


def quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    """Quantize float rows the way llama.cpp's reference quantizers do (no importance matrix).

    x: float (rows, cols) (a 1-D x is one row; more axes are flattened into rows). Returns uint8
    (rows, row_bytes(qtype, cols)). Q4_K and Q6_K reimplement quantize_row_q4_K_ref /
    quantize_row_q6_K_ref in float32 with the C operation order: left-to-right float32 sums, no
    fused multiply-add, nearest_int via the 1.5*2**23 trick, fp16 scales rounded to nearest even.
    That gives llama.cpp's bytes on all golden vectors (tests/test_formats.py). Q5_0 and Q8_0 go
    through gguf.quants.quantize (also byte-identical there). Non-finite inputs give unspecified
    bytes (as in llama.cpp).
    """
    qtype = _check(qtype)
    x = np.asarray(x, dtype=_F32)
    if x.ndim == 0:
        raise QuantShapeError(f"{qtype_name(qtype)}: cannot quantize a scalar")
    cols = x.shape[-1]
    rb = row_bytes(qtype, cols)
    x = np.ascontiguousarray(x.reshape(-1, cols))
    rows = x.shape[0]
    if rows == 0:
        return np.zeros((0, rb), dtype=np.uint8)
    if qtype == Q4_K:
        blocks = _quantize_q4_k(x)
    elif qtype == Q6_K:
        blocks = _quantize_q6_k(x)
    else:
        from gguf import quants as _gq

        with np.errstate(all="ignore"):
            q = _gq.quantize(x, _T(qtype))
        return np.ascontiguousarray(q, dtype=np.uint8).reshape(rows, rb)
    return blocks.view(np.uint8).reshape(rows, rb)


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of approximation y of x, in dB (float64 sums).

    inf when y == x exactly; -inf when x is all zero but y is not."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    noise = float(np.sum((x - y) ** 2))
    signal = float(np.sum(x * x))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


# ----------------------------------------------------------------------------------------------
# llama.cpp's Q4_K_M recipe
# ----------------------------------------------------------------------------------------------

F32 = int(_T.F32)
F16 = int(_T.F16)
_Q5_1 = int(_T.Q5_1)
_Q5_K = int(_T.Q5_K)

# Substrings of names llama.cpp never quantizes (tensor_allows_quantization), beyond the
# "ends with weight" / 1-D rules.
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")
# tensor_type_fallback: a row length the target's block size does not divide
_FALLBACK = {Q4_K: Q5_0, _Q5_K: _Q5_1, Q6_K: Q8_0}
_BLOCK_OF = {Q4_K: 256, _Q5_K: 256, Q6_K: 256, Q5_0: 32, _Q5_1: 32, Q8_0: 32}


def _layer_from_name(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    head = name[4:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # C integer division on non-negative ints == Python //
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(
    name: str,
    n_layers: int,
    layer: int | None,
    cols: int,
    n_expert: int = 0,
    *,
    n_dims: int = 2,
    n_attention_wv: int | None = None,
    tied_embeddings: bool = False,
    arch: str = "",
) -> int:
    """GGML type id llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M recipe (no imatrix, no overrides, not
    --pure) gives the GGUF tensor `name` with row length `cols` (ne[0]).

    Follows src/llama-quant.cpp (llama_tensor_get_type / llama_tensor_get_type_impl /
    tensor_type_fallback, ggml-org master, 2026). Rules implemented:

    * not quantized -> F32 (llama.cpp keeps the source type; for our models that is F32): 1-D
      tensors (n_dims < 2), names not ending in "weight", *_norm.weight, ffn_gate_inp.weight
      (routers) and the other exclusions of tensor_allows_quantization.
    * default type Q4_K.
    * output.weight, and token_embd.weight when `tied_embeddings` (no output.weight in the
      model): Q8_0 if arch == "falcon" or cols % 256 != 0, else Q6_K.
    * token_embd.weight (untied): Q4_K.
    * attn_v.weight, attn_qkv.weight, attn_kv_b.weight (llama.cpp's "attn_v-like" category):
      Q6_K when use_more_bits(i, n), else Q4_K; then Q8_0 when n_expert == 8. Here i is
      llama.cpp's running counter i_attention_wv over attn_v-like tensors in its tensor order
      (tensors sorted by block number, then name) and n = n_attention_wv (their count, default
      n_layers). With one attn_v-like tensor per block the counter equals the block index, so
      `layer` = block index is right for every standard model.
    * attn_k.weight: Q8_0 when n_expert == 8.
    * attn_output.weight: Q5_K when n_expert == 8 (not falcon).
    * any name containing "ffn_down" (ffn_down, ffn_down_exps, ffn_down_shexp, ...):
      use_more_bits(i_layer, n_layers) -> Q6_K, else Q4_K (falcon: Q6_K for i_layer <
      n_layers/16, Q5_K for use_more_bits, else Q4_K). n_layers is hparams n_layer (llama.cpp sets
      n_ffn_down = n_layer). With n_expert > 1 llama.cpp takes i_layer from the name ("blk.N.");
      with a dense model it uses the running counter i_ffn_down over all ffn_down* tensors seen
      so far. Pass that value as `layer`; layer=None parses "blk.N." from the name, which equals
      both for a model with one ffn_down* tensor per block. So for DeepSeek-V2 (n_expert 64) the
      dense blk.0.ffn_down and every blk.N.ffn_down_exps / ffn_down_shexp use their block index
      N; the counter only matters for dense models with several ffn_down* tensors per block.
    * ffn_gate*, ffn_up*, attn_q, everything else: Q4_K.
    * use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 (integer division).
    * fallback when cols is not a multiple of the chosen type's block size: Q4_K -> Q5_0,
      Q5_K -> Q5_1, Q6_K -> Q8_0; F16 if even that does not fit (cols % 32 != 0).

    Not modelled: the LLM_TYPE_70B bump of attn_v to Q5_K, user --tensor-type / --output-tensor-type
    overrides, imatrix-dependent rules (none apply to Q4_K_M).
    Returns an int GGML type id (may be Q5_K, Q5_1 or F16, which are not expert formats here).
    """
    if int(n_dims) < 2 or not name.endswith("weight"):
        return F32
    if any(s in name for s in _KEEP_SUBSTRINGS) or name in _KEEP_NAMES:
        return F32
    cols = int(cols)
    if cols <= 0:
        raise QuantShapeError(f"{name}: row length must be positive, found {cols}")
    falcon = arch == "falcon"
    if layer is None:
        layer = _layer_from_name(name)

    def need_layer() -> int:
        if layer is None:
            raise ModelConfigError(f"{name}: cannot determine the layer (no 'blk.N.' and no layer given)")
        if not 0 <= layer < max(n_layers, 1) and n_expert > 1:
            raise ModelConfigError(f"{name}: bad layer {layer} (must be in [0, {n_layers}))")
        return int(layer)

    new = Q4_K
    if name == "output.weight" or (tied_embeddings and name in ("token_embd.weight", "per_layer_token_embd.weight")):
        new = Q8_0 if (falcon or cols % 256) else Q6_K
    elif name in ("token_embd.weight", "per_layer_token_embd.weight"):
        new = Q4_K
    elif "attn_qkv.weight" in name or "attn_kv_b.weight" in name or "attn_v.weight" in name:
        n_wv = n_layers if n_attention_wv is None else int(n_attention_wv)
        if _use_more_bits(need_layer(), n_wv):
            new = Q6_K
        if n_expert == 8:
            new = Q8_0
    elif "attn_k.weight" in name:
        if n_expert == 8:
            new = Q8_0
    elif "attn_q.weight" in name:
        pass
    elif "attn_output.weight" in name:
        if not falcon and n_expert == 8:
            new = _Q5_K
    elif "ffn_up" in name or "ffn_gate" in name:
        pass
    elif "ffn_down" in name:
        i = need_layer()
        if falcon:
            new = Q6_K if i < n_layers // 16 else (_Q5_K if _use_more_bits(i, n_layers) else Q4_K)
        elif _use_more_bits(i, n_layers):
            new = Q6_K

    if cols % _BLOCK_OF[new]:
        if new not in _FALLBACK:
            raise QuantShapeError(f"{name}: no fallback for {qtype_name(new)} with row length {cols}")
        new = _FALLBACK[new]
        if cols % _BLOCK_OF[new]:
            new = F16
    return new
