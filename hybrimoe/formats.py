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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as _T

from .errors import QuantShapeError, UnsupportedQuantError

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
