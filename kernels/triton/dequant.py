"""Triton dequantization of GGUF expert blocks (Q4_K, Q6_K, Q5_0, Q8_0), in registers.

`dequant_tile` is the one place the four block layouts are decoded in Triton; the fused MoE
kernels (moe.py) call it on each weight tile, and `dequantize_kernel` writes whole tensors.
Layouts: kernels/cpu/blocks.h and hybrimoe/formats.py (numpy twin: formats.dequantize).

Everything is read with byte loads and assembled in registers: the fp16 scales of Q5_0 (22-byte
blocks) and Q8_0 (34-byte blocks) sit at 2-aligned offsets, so wider loads would be misaligned.
A tile is decoded as [BN rows, NG groups, G elements], where a group is the run of weights that
shares one scale (32 for Q4_K/Q5_0/Q8_0, 16 for Q6_K): per-group scales are loaded once per
(row, group) and broadcast, and only the quants are loaded per element (two bytes per weight for
Q6_K, one for the others). The tile is then flattened to [BN, BK] in natural column order.

Importing this module imports Triton; hybrimoe imports it lazily (hybrimoe/gpu.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

# GGML type ids (== hybrimoe.formats.Q4_K etc.); repeated as plain ints because Triton
# constexpr comparisons need literals in this module.
Q5_0 = 6
Q8_0 = 8
Q4_K = 12
Q6_K = 14

# Elements sharing one scale (the "group" of a tile) and bytes per block, by type.
GROUP_ELEMS = {Q4_K: 32, Q6_K: 16, Q5_0: 32, Q8_0: 32}
BLOCK_ELEMS = {Q4_K: 256, Q6_K: 256, Q5_0: 32, Q8_0: 32}
BLOCK_BYTES = {Q4_K: 144, Q6_K: 210, Q5_0: 22, Q8_0: 34}


@triton.jit
def _u8(ptr, off, mask):
    """One byte at ptr+off as int32 (0 where masked)."""
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, off, mask):
    """Little-endian fp16 at any byte alignment -> fp32."""
    bits = _u8(ptr, off, mask) | (_u8(ptr, off + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _i8(v):
    """int32 holding a byte 0..255 -> its value as a signed int8, still int32."""
    return (v ^ 0x80) - 0x80


@triton.jit
def _q4k_scale_min(ptr, soff, j, mask):
    """Q4_K 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at ptr+soff.

    Same rule as get_scale_min_k4 in kernels/cpu/blocks.h (the C++ one): j < 4 reads the low 6
    bits of bytes j and j+4; j >= 4 takes 4 bits from byte j+4 and the top 2 bits of bytes j-4 / j.
    """
    lo = j < 4
    a = _u8(ptr, soff + j, mask)                          # byte j
    b = _u8(ptr, soff + j + 4, mask)                      # byte j+4
    c = _u8(ptr, soff + tl.where(lo, j, j - 4), mask)     # byte j-4 (j >= 4 only)
    sc = tl.where(lo, a & 63, (b & 0xF) | ((c >> 6) << 4))
    mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def dequant_tile(ptr, rows, row_mask, k0, K, row_bytes,
                 QTYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Dequantize W[rows, k0:k0+BK] of a row-major quantized matrix to fp32 [BN, BK].

    ptr:       uint8 pointer to the matrix's first block (row 0)
    rows:      [BN] int32 row indices; row_mask: [BN] bool (rows >= the matrix's rows are masked).
               Offsets from ptr are int32 (one matrix is < 2 GiB; callers move ptr in int64),
               which halves the registers the per-element offsets take.
    k0:        first column; must be a multiple of the type's group (32, or 16 for Q6_K)
    K:         columns of the matrix (a multiple of the block size); columns >= K come out 0
    row_bytes: bytes of one quantized row
    BK:        tile width, a multiple of 32 (and of nothing else: Q4_K/Q6_K tiles may cover part
               of a 256-weight super-block)
    """
    if QTYPE == 12:  # Q4_K: 144 B per 256: d, dmin, 12 B scales/mins, 128 B nibbles
        G: tl.constexpr = 32
        NG: tl.constexpr = BK // G
        g = k0 // G + tl.arange(0, NG)                     # global sub-block index
        blk = g // 8
        j = g % 8
        gmask = row_mask[:, None] & (g < K // G)[None, :]  # [BN, NG]
        boff = rows[:, None] * row_bytes + (blk * 144)[None, :]
        d = _f16(ptr, boff, gmask)
        dmin = _f16(ptr, boff + 2, gmask)
        sc, mn = _q4k_scale_min(ptr, boff + 4, j[None, :], gmask)
        e = tl.arange(0, G)
        # chunk of 64 weights = 32 bytes: sub-block 2c in the low nibbles, 2c+1 in the high ones
        qoff = boff[:, :, None] + (16 + 32 * (j // 2))[None, :, None] + e[None, None, :]
        q = (_u8(ptr, qoff, gmask[:, :, None]) >> (4 * (j % 2))[None, :, None]) & 0xF
        w = (d * sc)[:, :, None] * q.to(tl.float32) - (dmin * mn)[:, :, None]
    elif QTYPE == 14:  # Q6_K: 210 B per 256: 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales, d
        G: tl.constexpr = 16
        NG: tl.constexpr = BK // G
        g = k0 // G + tl.arange(0, NG)
        blk = g // 16
        s = g % 16                                         # scale index = sub-block of 16
        gmask = row_mask[:, None] & (g < K // G)[None, :]
        boff = rows[:, None] * row_bytes + (blk * 210)[None, :]
        d = _f16(ptr, boff + 208, gmask)
        sc = _i8(_u8(ptr, boff + 192 + s[None, :], gmask)).to(tl.float32)
        # weight i = 16 s + e of a super-block: half h = i // 128, quarter q4 = (i % 128) // 32,
        # l = i % 32; low 4 bits from ql[64h + 32(q4 & 1) + l] (nibble q4 >> 1), high 2 bits from
        # qh[32h + l] (bits 2 q4).
        h = s // 8
        q4 = (s % 8) // 2
        e = tl.arange(0, G)
        l = (16 * (s % 2))[None, :, None] + e[None, None, :]
        m3 = gmask[:, :, None]
        ql = _u8(ptr, boff[:, :, None] + (64 * h + 32 * (q4 & 1))[None, :, None] + l, m3)
        qh = _u8(ptr, boff[:, :, None] + (128 + 32 * h)[None, :, None] + l, m3)
        lo4 = (ql >> (4 * (q4 >> 1))[None, :, None]) & 0xF
        hi2 = (qh >> (2 * q4)[None, :, None]) & 3
        q = (lo4 | (hi2 << 4)) - 32
        w = (d * sc)[:, :, None] * q.to(tl.float32)
    elif QTYPE == 6:  # Q5_0: 22 B per 32: d, 4 B high bits, 16 B nibbles
        G: tl.constexpr = 32
        NG: tl.constexpr = BK // G
        g = k0 // G + tl.arange(0, NG)
        gmask = row_mask[:, None] & (g < K // G)[None, :]
        boff = rows[:, None] * row_bytes + (g * 22)[None, :]
        d = _f16(ptr, boff, gmask)
        qh = (_u8(ptr, boff + 2, gmask) | (_u8(ptr, boff + 3, gmask) << 8)
              | (_u8(ptr, boff + 4, gmask) << 16) | (_u8(ptr, boff + 5, gmask) << 24))
        e = tl.arange(0, G)
        # weight e < 16: low nibble of qs[e]; e >= 16: high nibble of qs[e - 16]; 5th bit = qh bit e
        qs = _u8(ptr, boff[:, :, None] + 6 + (e % 16)[None, None, :], gmask[:, :, None])
        lo4 = (qs >> (4 * (e // 16))[None, None, :]) & 0xF
        hb = (qh[:, :, None] >> e[None, None, :]) & 1
        q = (lo4 | (hb << 4)) - 16
        w = d[:, :, None] * q.to(tl.float32)
    else:  # Q8_0 (8): 34 B per 32: d, 32 int8
        tl.static_assert(QTYPE == 8, "dequant_tile: QTYPE must be Q4_K(12), Q6_K(14), Q5_0(6) or Q8_0(8)")
        G: tl.constexpr = 32
        NG: tl.constexpr = BK // G
        g = k0 // G + tl.arange(0, NG)
        gmask = row_mask[:, None] & (g < K // G)[None, :]
        boff = rows[:, None] * row_bytes + (g * 34)[None, :]
        d = _f16(ptr, boff, gmask)
        e = tl.arange(0, G)
        q = _i8(_u8(ptr, boff[:, :, None] + 2 + e[None, None, :], gmask[:, :, None]))
        w = d[:, :, None] * q.to(tl.float32)
    return tl.reshape(w, [BN, BK])


@triton.jit
def dequantize_kernel(src_ptr, out_ptr, N, K, row_bytes, stride_out,
                      QTYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[N, K] (row stride stride_out, out's dtype) = dequantized src (N rows of row_bytes).
    Grid: (cdiv(N, BN), cdiv(K, BK))."""
    row0 = tl.program_id(0) * BN
    rows = tl.arange(0, BN)                                # local to this program's first row
    k0 = tl.program_id(1) * BK
    rmask = row0 + rows < N
    src = src_ptr + row0.to(tl.int64) * row_bytes          # the whole tensor may exceed 2 GiB
    w = dequant_tile(src, rows, rmask, k0, K, row_bytes, QTYPE, BN, BK)
    cols = k0 + tl.arange(0, BK)
    optr = out_ptr + (row0 + rows).to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(optr, w.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (cols < K)[None, :])


@triton.jit
def _f16_lo(word):
    """fp16 in the low 16 bits of an int32 -> fp32."""
    return (word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def q4k_dot_superblock(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN: tl.constexpr):
    """[BN] fp32: sum over k in [k0, k0 + 256) of W[rows, k] * x[k], W in Q4_K (GEMV, one token).

    The fast path for the batch-1 decode GEMV: the super-block is read as 36 aligned int32 words
    per row (a 144-byte Q4_K block is 16-byte aligned whenever the matrix is, as every arena slot
    is) instead of a byte per weight, and the scales are factored out of the inner sum:
        sum_k w x = sum_j d*sc_j * sum_{k in j} q_k x_k  -  dmin*m_j * sum_{k in j} x_k.
    Word w = 8c + i of the quants holds, in byte b, weight 64c + 4i + b (low nibble, sub-block 2c)
    and 64c + 32 + 4i + b (high nibble, sub-block 2c + 1).
    ptr: uint8 pointer, 4-byte aligned; x_ptr: the token's activations (any float dtype); k0 a
    multiple of 256; columns >= K contribute 0.
    """
    ok = row_mask & (k0 < K)
    wptr = ptr.to(tl.pointer_type(tl.int32))
    wbase = (rows * row_bytes + (k0 // 256) * 144) // 4                       # [BN] word index
    dd = tl.load(wptr + wbase, mask=ok, other=0)                              # d | dmin << 16
    s0 = tl.load(wptr + wbase + 1, mask=ok, other=0)                          # scale bytes 0..3
    s1 = tl.load(wptr + wbase + 2, mask=ok, other=0)                          # 4..7
    s2 = tl.load(wptr + wbase + 3, mask=ok, other=0)                          # 8..11
    d = _f16_lo(dd)
    dmin = _f16_lo(dd >> 16)
    c = tl.arange(0, 4)
    i = tl.arange(0, 8)
    q = tl.load(wptr + (wbase + 4)[:, None, None] + (8 * c)[None, :, None] + i[None, None, :],
                mask=ok[:, None, None], other=0)                              # [BN, 4, 8]
    xmask = (k0 < K)
    acc = tl.zeros([BN], dtype=tl.float32)
    for h in tl.static_range(2):                     # low nibbles: sub-block 2c; high: 2c + 1
        s = tl.zeros([BN, 4, 8], dtype=tl.float32)
        xs = tl.zeros([4, 8], dtype=tl.float32)
        for b in tl.static_range(4):
            xv = tl.load(x_ptr + k0 + (64 * c + 32 * h + b)[:, None] + (4 * i)[None, :],
                         mask=xmask, other=0.0).to(tl.float32)                # [4, 8]
            s += ((q >> (8 * b + 4 * h)) & 0xF).to(tl.float32) * xv[None, :, :]
            xs += xv
        # 6-bit scale/min of sub-block j = 2c + h (get_scale_min_k4 in blocks.h, on words):
        # j < 4: bytes j and j+4; j >= 4: byte j+4 and the top bits of bytes j-4 and j. In both
        # cases the byte index within its word is 2(c % 2) + h.
        sh = (16 * (c % 2) + 8 * h)[None, :]
        a0 = s0[:, None] >> sh
        a1 = s1[:, None] >> sh
        a2 = s2[:, None] >> sh
        lo = (c < 2)[None, :]
        sc = tl.where(lo, a0 & 63, (a2 & 0xF) | (((a0 >> 6) & 3) << 4)).to(tl.float32)
        mn = tl.where(lo, a1 & 63, ((a2 >> 4) & 0xF) | (((a1 >> 6) & 3) << 4)).to(tl.float32)
        part = d[:, None] * sc * tl.sum(s, axis=2) - dmin[:, None] * mn * tl.sum(xs, axis=1)[None, :]
        acc += tl.sum(part, axis=1)
    return acc


@triton.jit
def _hw(hptr, off, mask):
    """Little-endian 16-bit halfword (int16 pointer, halfword offset) as int32 0..65535."""
    return tl.load(hptr + off, mask=mask, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def q6k_dot_superblock(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN: tl.constexpr):
    """[BN] fp32: sum over k in [k0, k0 + 256) of W[rows, k] * x[k], W in Q6_K (one token).

    210-byte blocks are only 2-byte aligned, so the quants are read as halfwords (a quarter of
    the load instructions of byte loads). Weight 128h + 32g + 2v + p (h < 2, g < 4, v < 16,
    p < 2) has its low 4 bits in ql halfword 32h + 16(g & 1) + v, byte p, nibble g >> 1, and its
    high 2 bits in qh halfword 16h + v, byte p, bits 2g; scale 8h + 2g + v // 8. The tile is
    [BN, 8 groups a, 8] with a = 4h + 2(g & 1) + v // 8, so ql halfword = 8a + v % 8.
    """
    ok = row_mask & (k0 < K)
    hptr = ptr.to(tl.pointer_type(tl.int16))
    hbase = (rows * row_bytes + (k0 // 256) * 210) // 2                       # [BN] halfwords
    d = _hw(hptr, hbase + 104, ok).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    a = tl.arange(0, 8)
    v8 = tl.arange(0, 8)
    h = a // 4
    g1 = (a // 2) % 2                                # g & 1
    s8 = a % 2                                       # v // 8
    m3 = ok[:, None, None]
    ql = _hw(hptr, hbase[:, None, None] + (8 * a)[None, :, None] + v8[None, None, :], m3)
    qh = _hw(hptr, hbase[:, None, None] + (64 + 16 * h + 8 * s8)[None, :, None] + v8[None, None, :], m3)
    bptr = ptr + rows[:, None] * row_bytes + (k0 // 256) * 210 + 192          # int8 scales
    acc = tl.zeros([BN], dtype=tl.float32)
    for nib in tl.static_range(2):                   # g = 2 nib + (g & 1)
        g = 2 * nib + g1                             # [8]
        s = tl.zeros([BN, 8, 8], dtype=tl.float32)
        for p in tl.static_range(2):
            lo4 = (ql >> (8 * p + 4 * nib)) & 0xF
            hi2 = (qh >> (8 * p + 2 * g)[None, :, None]) & 3
            q = ((lo4 | (hi2 << 4)) - 32).to(tl.float32)
            xoff = (128 * h + 32 * g + 16 * s8 + p)[:, None] + (2 * v8)[None, :]
            xv = tl.load(x_ptr + k0 + xoff, mask=k0 < K, other=0.0).to(tl.float32)   # [8, 8]
            s += q * xv[None, :, :]
        sc = _i8(tl.load(bptr + (8 * h + 2 * g + s8)[None, :], mask=ok[:, None], other=0)
                 .to(tl.int32)).to(tl.float32)                                # [BN, 8]
        acc += tl.sum(sc * tl.sum(s, axis=2), axis=1)
    return d * acc


@triton.jit
def q8_0_dot(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN: tl.constexpr, BK: tl.constexpr):
    """[BN] fp32: sum over k in [k0, k0 + BK) of W[rows, k] * x[k], W in Q8_0 (one token).
    34-byte blocks, read as 17 halfwords: d, then quants 2v (low byte) and 2v + 1 (high byte)."""
    NB: tl.constexpr = BK // 32
    b = k0 // 32 + tl.arange(0, NB)
    ok = row_mask[:, None] & (b < K // 32)[None, :]                           # [BN, NB]
    hptr = ptr.to(tl.pointer_type(tl.int16))
    hbase = (rows[:, None] * row_bytes + b[None, :] * 34) // 2                # [BN, NB]
    d = _hw(hptr, hbase, ok).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    v = tl.arange(0, 16)
    qw = _hw(hptr, hbase[:, :, None] + 1 + v[None, None, :], ok[:, :, None])  # [BN, NB, 16]
    xmask = (b < K // 32)[:, None]
    s = tl.zeros([BN, NB, 16], dtype=tl.float32)
    for p in tl.static_range(2):
        xv = tl.load(x_ptr + (32 * b)[:, None] + (2 * v + p)[None, :], mask=xmask, other=0.0)
        s += _i8((qw >> (8 * p)) & 0xFF).to(tl.float32) * xv.to(tl.float32)[None, :, :]
    return tl.sum(d * tl.sum(s, axis=2), axis=1)


@triton.jit
def q5_0_dot(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN: tl.constexpr, BK: tl.constexpr):
    """[BN] fp32: sum over k in [k0, k0 + BK) of W[rows, k] * x[k], W in Q5_0 (one token).
    22-byte blocks, read as 11 halfwords: d, qh (2), then quant byte 2v + p holds weights
    2v + p (low nibble) and 16 + 2v + p (high nibble); their 5th bits are qh bits of the same index."""
    NB: tl.constexpr = BK // 32
    b = k0 // 32 + tl.arange(0, NB)
    ok = row_mask[:, None] & (b < K // 32)[None, :]
    hptr = ptr.to(tl.pointer_type(tl.int16))
    hbase = (rows[:, None] * row_bytes + b[None, :] * 22) // 2
    d = _hw(hptr, hbase, ok).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    qh = _hw(hptr, hbase + 1, ok) | (_hw(hptr, hbase + 2, ok) << 16)          # [BN, NB]
    v = tl.arange(0, 8)
    qw = _hw(hptr, hbase[:, :, None] + 3 + v[None, None, :], ok[:, :, None])  # [BN, NB, 8]
    xmask = (b < K // 32)[:, None]
    s = tl.zeros([BN, NB, 8], dtype=tl.float32)
    for nib in tl.static_range(2):
        for p in tl.static_range(2):
            e = 16 * nib + 2 * v + p                                          # [8]
            lo4 = (qw >> (8 * p + 4 * nib)) & 0xF
            hb = (qh[:, :, None] >> e[None, None, :]) & 1
            q = ((lo4 | (hb << 4)) - 16).to(tl.float32)
            xv = tl.load(x_ptr + (32 * b)[:, None] + e[None, :], mask=xmask, other=0.0)
            s += q * xv.to(tl.float32)[None, :, :]
    return tl.sum(d * tl.sum(s, axis=2), axis=1)


@triton.jit
def gemv_step(ptr, rows, row_mask, k0, K, row_bytes, x_ptr,
              QTYPE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """[BN] fp32: sum over k in [k0, k0 + BK) of W[rows, k] * x[k] (one token, fp32 math)."""
    if QTYPE == 12:
        tl.static_assert(BK % 256 == 0, "the Q4_K GEMV step needs block_k a multiple of 256")
        acc = q4k_dot_superblock(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN)
        for s in tl.static_range(1, BK // 256):
            acc += q4k_dot_superblock(ptr, rows, row_mask, k0 + 256 * s, K, row_bytes, x_ptr, BN)
    elif QTYPE == 14:
        tl.static_assert(BK % 256 == 0, "the Q6_K GEMV step needs block_k a multiple of 256")
        acc = q6k_dot_superblock(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN)
        for s in tl.static_range(1, BK // 256):
            acc += q6k_dot_superblock(ptr, rows, row_mask, k0 + 256 * s, K, row_bytes, x_ptr, BN)
    elif QTYPE == 8:
        acc = q8_0_dot(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN, BK)
    else:
        tl.static_assert(QTYPE == 6, "gemv_step: QTYPE must be Q4_K(12), Q6_K(14), Q5_0(6) or Q8_0(8)")
        acc = q5_0_dot(ptr, rows, row_mask, k0, K, row_bytes, x_ptr, BN, BK)
    return acc
