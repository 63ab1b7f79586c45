"""Fused grouped MoE over a GPU slot arena of quantized experts (Triton).

    x (T, H) -> gate_up_kernel -> h (P, I) = silu(x Wg^T) * (x Wu^T)   one row per (token, k) pair
             -> down_kernel    -> y (P, H) = w_pair * h Wd^T             fp32, one row per pair
             -> combine_kernel -> out (T, H) = sum_k y[t, k]             fixed k order: deterministic

Three launches per layer whatever the path. P = T*K pairs; pair p = t*K + k. Pairs whose expert
is not resident (slot_of_expert[e] == -1) are skipped by all three kernels (the CPU computes
them); their rows of h and y are never written or read.

The shape constants (K, H, I) and the quant types are compile-time constants: one compiled
variant per model shape, loop bounds and masks known to the compiler (Triton 3.6's CPU
interpreter also cannot take run-time loop bounds with numpy >= 2.5).

Rows of a program ("m-block") are the pairs of one expert:
  * decode (GROUPED=False, T <= BM <= 16): no sort. Program m is pair m; it runs only if pair m is
    the first pair routed to its expert, and then takes every token routed to that expert as its
    rows (row t = token t, masked where token t does not use the expert). So each expert's weight
    tile is read from HBM once for all tokens, with no launch spent on grouping.
    Precondition: a token's top-k ids are distinct (every router gives that).
  * prefill (GROUPED=True): the host side sorts pairs by expert (hybrimoe/gpu.py `align_pairs`,
    torch ops with no host sync) and gives, per m-block, its expert and its range in the sorted pair
    list. The grid is an upper bound on the m-blocks; surplus programs exit at once.

Weights are dequantized in registers and never written back. Two inner loops:
  * BM >= 16 (decode with 2..16 tokens, prefill): dequant.dequant_tile gives a [BN, BK] tile that
    feeds tl.dot (inputs in x's dtype; fp32 x uses input_precision="ieee"; fp32 accumulation).
  * BM == 1 (decode, one token): dequant.gemv_step, a GEMV in fp32; Q4_K reads whole aligned
    super-blocks as int32 words and applies scales per sub-block (q4k_dot_superblock), the other
    types dequantize a tile and reduce it against x.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import dequant_tile, gemv_step


@triton.jit
def _block_rows(pid_m, ids_ptr, slot_ptr, sorted_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
                T, K: tl.constexpr, GROUPED: tl.constexpr, BM: tl.constexpr, KP: tl.constexpr):
    """Rows of m-block pid_m: (slot, pair [BM], token [BM], row mask [BM]); slot < 0: nothing to do."""
    r = tl.arange(0, BM)
    if GROUPED:
        e = tl.load(blk_expert_ptr + pid_m)
        start = tl.load(blk_start_ptr + pid_m)
        end = tl.load(blk_end_ptr + pid_m)
        idx = start + r
        rmask = (idx < end) & (e >= 0)
        pair = tl.load(sorted_ptr + idx, mask=rmask, other=0)
        tok = pair // K
        slot = tl.load(slot_ptr + tl.maximum(e, 0))
        slot = tl.where(e >= 0, slot, -1)
    else:
        e = tl.load(ids_ptr + pid_m).to(tl.int32)
        slot = tl.load(slot_ptr + e)
        k = tl.arange(0, KP)
        q = r[:, None] * K + k[None, :]                    # pair index of (token r, slot k)
        qmask = (r[:, None] < T) & (k[None, :] < K)
        ids = tl.load(ids_ptr + q, mask=qmask, other=-1).to(tl.int32)
        match = ids == e
        earlier = tl.sum((match & (q < pid_m)).to(tl.int32), axis=1)
        first = tl.sum(earlier, axis=0) == 0
        slot = tl.where(first, slot, -1)                   # a later pair of the same expert: skip
        has = tl.sum(match.to(tl.int32), axis=1) > 0
        kk = tl.sum(tl.where(match, k[None, :], 0), axis=1)
        tok = r
        pair = r * K + kk
        rmask = has
    return slot, pair, tok, rmask


@triton.jit
def _mac(acc, a, w, BM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc[BM, BN] += a[BM, BK] @ w[BN, BK]^T with tl.dot (BM >= 16), fp32 accumulation."""
    if DOT_DTYPE == tl.float32:
        acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)
    return acc


@triton.jit
def gate_up_kernel(
    x_ptr, stride_x, ids_ptr, slot_ptr, arena_ptr, slot_bytes,
    sorted_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    h_ptr, T,
    gate_off, up_off, gate_row_bytes, up_row_bytes,
    K: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    GATE_T: tl.constexpr, UP_T: tl.constexpr, GROUPED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """h[pair, n] = silu(x[tok] . gate[n]) * (x[tok] . up[n]) for the pairs of one m-block and a
    tile of BN intermediate columns. Grid: (m-blocks, cdiv(I, BN))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, pair, tok, rmask = _block_rows(pid_m, ids_ptr, slot_ptr, sorted_ptr, blk_expert_ptr,
                                         blk_start_ptr, blk_end_ptr, T, K, GROUPED, BM, KP)
    if slot >= 0:
        base = arena_ptr + slot.to(tl.int64) * slot_bytes
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < I
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        xrow = x_ptr + tok.to(tl.int64)[:, None] * stride_x
        for k0 in range(0, H, BK):
            if BM == 1:  # one token (decode, T == 1: token 0): GEMV with fp32 math
                acc_g += gemv_step(base + gate_off, n, nmask, k0, H, gate_row_bytes, x_ptr,
                                   GATE_T, BN, BK)[None, :]
                acc_u += gemv_step(base + up_off, n, nmask, k0, H, up_row_bytes, x_ptr,
                                   UP_T, BN, BK)[None, :]
            else:
                ks = k0 + tl.arange(0, BK)
                xt = tl.load(xrow + ks[None, :], mask=rmask[:, None] & (ks < H)[None, :], other=0.0)
                wg = dequant_tile(base + gate_off, n, nmask, k0, H, gate_row_bytes, GATE_T, BN, BK)
                acc_g = _mac(acc_g, xt, wg, BM, DOT_DTYPE)
                wu = dequant_tile(base + up_off, n, nmask, k0, H, up_row_bytes, UP_T, BN, BK)
                acc_u = _mac(acc_u, xt, wu, BM, DOT_DTYPE)
        hval = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        hptr = h_ptr + pair.to(tl.int64)[:, None] * I + n[None, :]
        tl.store(hptr, hval.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def down_kernel(
    h_ptr, wts_ptr, ids_ptr, slot_ptr, arena_ptr, slot_bytes,
    sorted_ptr, blk_expert_ptr, blk_start_ptr, blk_end_ptr,
    y_ptr, T,
    down_off, down_row_bytes,
    K: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
    DOWN_T: tl.constexpr, GROUPED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """y[pair, n] = topk_weight[pair] * (h[pair] . down[n]) (fp32) for the pairs of one m-block
    and a tile of BN hidden columns. Grid: (m-blocks, cdiv(H, BN))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, pair, tok, rmask = _block_rows(pid_m, ids_ptr, slot_ptr, sorted_ptr, blk_expert_ptr,
                                         blk_start_ptr, blk_end_ptr, T, K, GROUPED, BM, KP)
    if slot >= 0:
        base = arena_ptr + slot.to(tl.int64) * slot_bytes + down_off
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < H
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        hrow = h_ptr + pair.to(tl.int64)[:, None] * I
        for k0 in range(0, I, BK):
            if BM == 1:  # one pair: GEMV with fp32 math on its h row
                h1 = h_ptr + tl.sum(pair, axis=0).to(tl.int64) * I
                acc += gemv_step(base, n, nmask, k0, I, down_row_bytes, h1, DOWN_T, BN, BK)[None, :]
            else:
                ks = k0 + tl.arange(0, BK)
                ht = tl.load(hrow + ks[None, :], mask=rmask[:, None] & (ks < I)[None, :], other=0.0)
                wd = dequant_tile(base, n, nmask, k0, I, down_row_bytes, DOWN_T, BN, BK)
                acc = _mac(acc, ht, wd, BM, DOT_DTYPE)
        wt = tl.load(wts_ptr + pair, mask=rmask, other=0.0).to(tl.float32)
        yptr = y_ptr + pair.to(tl.int64)[:, None] * H + n[None, :]
        tl.store(yptr, acc * wt[:, None], mask=rmask[:, None] & nmask[None, :])


@triton.jit
def combine_kernel(y_ptr, ids_ptr, slot_ptr, out_ptr, stride_out,
                   K: tl.constexpr, H: tl.constexpr, KP: tl.constexpr, BH: tl.constexpr,
                   ACCUMULATE: tl.constexpr = False):
    """out[t, n] (+)= sum over k = 0..K-1, in that order, of y[t*K + k, n] for resident pairs only
    (0 if none); ACCUMULATE adds to out's values (fp32 sum, one rounding). Grid: (T, cdiv(H, BH))."""
    t = tl.program_id(0)
    n = tl.program_id(1) * BH + tl.arange(0, BH)
    nmask = n < H
    k = tl.arange(0, KP)
    e = tl.load(ids_ptr + t * K + k, mask=k < K, other=0).to(tl.int32)
    slot = tl.load(slot_ptr + e, mask=k < K, other=-1)
    valid = (k < K) & (slot >= 0)
    acc = tl.zeros([BH], dtype=tl.float32)
    for kk in tl.static_range(K):
        ok = tl.sum(tl.where((k == kk) & valid, 1, 0), axis=0) > 0
        row = tl.load(y_ptr + (t * K + kk).to(tl.int64) * H + n, mask=nmask & ok, other=0.0)
        acc += row
    optr = out_ptr + t.to(tl.int64) * stride_out + n
    if ACCUMULATE:
        acc += tl.load(optr, mask=nmask, other=0.0).to(tl.float32)
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=nmask)
