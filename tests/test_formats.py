"""hybrimoe.formats: block layouts, dequantization, llama.cpp-exact quantization, Q4_K_M recipe."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from hybrimoe import formats as F
from hybrimoe.errors import ModelConfigError, QuantShapeError, UnsupportedQuantError

NAMES = {F.Q4_K: "Q4_K", F.Q6_K: "Q6_K", F.Q5_0: "Q5_0", F.Q8_0: "Q8_0"}
ALL = list(NAMES)
GOLDEN_CASES = ("gauss", "weights_0.02", "student_t3", "outliers", "zeros", "constant", "negative", "tiny", "large")

# Round-trip SQNR on N(0, 1) rows of 1024, measured over 20 seeds (min / mean):
#   Q4_K 22.87 / 22.95 dB, Q6_K 34.99 / 35.05 dB, Q5_0 27.34 / 27.41 dB, Q8_0 45.38 / 45.44 dB.
# Bounds sit about 0.9 dB under the means.
SQNR_MIN_DB = {F.Q4_K: 22.0, F.Q6_K: 34.0, F.Q5_0: 26.5, F.Q8_0: 44.5}
# Per-block bound for blocks that do not contain an injected outlier (same data, fewer samples).
SQNR_BLOCK_SLACK_DB = 3.0
# Seconds allowed for a 1408 x 2048 Q4_K quantize on the 2-core CI box (measured ~0.6 s idle).
QUANTIZE_SPEED_LIMIT_S = 20.0


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _random_blocks(rng, qtype: int, n_blocks: int) -> np.ndarray:
    """Random block bytes whose fp16 scale fields are finite (any sign, subnormals included)."""
    dt = F.BLOCK_DTYPES[qtype]
    raw = rng.integers(0, 256, size=n_blocks * dt.itemsize, dtype=np.uint8)
    blocks = raw.view(dt)
    for field in ("d", "dmin"):
        if field in dt.names:
            bits = blocks[field]
            exp_all_ones = (bits & 0x7C00) == 0x7C00
            blocks[field] = np.where(exp_all_ones, bits & ~np.uint16(0x4000), bits)  # inf/nan -> finite
    return raw


# ------------------------------------------------------------------------------------------------
# block layouts / shapes
# ------------------------------------------------------------------------------------------------


def test_block_sizes_match_gguf():
    for t in ALL:
        be, bb = gq.GGML_QUANT_SIZES[T(t)]
        assert F.block_elems(t) == be and F.block_bytes(t) == bb
        assert F.row_bytes(t, 4 * be) == 4 * bb


@pytest.mark.parametrize("qtype", ALL, ids=NAMES.get)
def test_dequantize_bit_identical_to_gguf(qtype, rng):
    be = F.block_elems(qtype)
    rows, cols = 3, be * (2 if be == 256 else 5)
    raw = _random_blocks(rng, qtype, rows * cols // be)
    ours = F.dequantize(raw, qtype, (rows, cols))
    ref = gq.dequantize(raw.reshape(rows, -1), T(qtype))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    assert np.isfinite(ours).all()
    assert _same_bits(ours, ref)
    # any raw shape whose bytes are the rows back to back; any leading shape
    assert _same_bits(F.dequantize(raw.reshape(rows, -1), qtype, (rows, cols)), ref)
    assert _same_bits(F.dequantize(raw, qtype, (rows, 1, cols)).reshape(rows, cols), ref)
    qt = F.QuantTensor(raw.reshape(rows, -1), qtype, (rows, cols))
    assert _same_bits(qt.dequantize(), ref) and qt.nbytes == raw.size


def test_unpack_q4k_scales_matches_gguf_and_repacks(rng):
    b = rng.integers(0, 256, size=(50, 12), dtype=np.uint8)
    sc, m = F.unpack_q4k_scales(b)
    gsc, gm = gq.Q4_K.get_scale_min(b)
    assert sc.dtype == np.uint8 and sc.shape == (50, 8)
    assert np.array_equal(sc, gsc) and np.array_equal(m, gm)
    assert sc.max() <= 63 and m.max() <= 63
    assert np.array_equal(F.unpack_q4k_scales(b.reshape(5, 10, 12))[0], sc.reshape(5, 10, 8))
    # the packer used by quantize() inverts it for 6-bit values
    ls = rng.integers(0, 64, size=(20, 8))
    lm = rng.integers(0, 64, size=(20, 8))
    sc2, m2 = F.unpack_q4k_scales(F._pack_q4k_scales(ls, lm))
    assert np.array_equal(sc2, ls) and np.array_equal(m2, lm)
    with pytest.raises(QuantShapeError):
        F.unpack_q4k_scales(np.zeros((3, 11), np.uint8))


# ------------------------------------------------------------------------------------------------
# golden vectors from llama.cpp
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL, ids=NAMES.get)
def test_golden_quantize_byte_identical(golden, qtype):
    name = NAMES[qtype]
    same, differ = [], []
    for case in GOLDEN_CASES:
        x, q = golden[f"{name}/{case}/x"], golden[f"{name}/{case}/q"]
        ours = F.quantize(x, qtype)
        assert ours.shape == (x.shape[0], F.row_bytes(qtype, x.shape[1]))
        (same if np.array_equal(ours.reshape(-1), q) else differ).append(case)
    print(f"{name}: {len(same)}/{len(GOLDEN_CASES)} golden cases byte-identical; differ: {differ}")
    assert not differ, f"{name}: our bytes differ from llama.cpp's for {differ}"


@pytest.mark.parametrize("qtype", ALL, ids=NAMES.get)
def test_golden_dequantize_identical(golden, qtype):
    name = NAMES[qtype]
    for case in GOLDEN_CASES:
        x, q, deq = (golden[f"{name}/{case}/{k}"] for k in ("x", "q", "deq"))
        assert _same_bits(F.dequantize(q, qtype, x.shape), deq), case


# ------------------------------------------------------------------------------------------------
# independent scalar ports of the C reference (one block at a time, np.float32 scalars) to
# cross-check the vectorised quantizers on inputs the golden file does not cover
# ------------------------------------------------------------------------------------------------

f32 = np.float32


def _ni(v) -> int:
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.array([f32(v) + f32(12582912.0)], dtype=np.float32)
    return int((s.view(np.int32)[0] & 0x007FFFFF) - 0x00400000)


def _h(v) -> np.float32:  # fp32 -> fp16 -> fp32
    return f32(np.float16(f32(v)))


def _scalar_q4_k_block(x: np.ndarray) -> tuple[np.float32, np.float32, list[int], list[int], list[int]]:
    L = [0] * 256
    scales, mins = [], []
    for j in range(8):
        xs = [f32(v) for v in x[32 * j : 32 * j + 32]]
        s2 = f32(0)
        for v in xs:
            s2 = f32(s2 + v * v)
        av = f32(np.sqrt(f32(s2 / f32(32))))
        w = [f32(av + abs(v)) for v in xs]
        mn, mx = xs[0], xs[0]
        sw, sx = w[0], f32(w[0] * xs[0])
        for i in range(1, 32):
            mn, mx = min(mn, xs[i]), max(mx, xs[i])
            sw = f32(sw + w[i])
            sx = f32(sx + f32(w[i] * xs[i]))
        if mn > 0:
            mn = f32(0)
        if mx == mn:
            scales.append(f32(0))
            mins.append(f32(-mn))
            continue
        isc = f32(f32(15) / f32(mx - mn))
        sc = f32(f32(1) / isc)
        Lb = [max(0, min(15, _ni(isc * (v - mn)))) for v in xs]
        best = f32(0)
        for i in range(32):
            d = f32(f32(f32(sc * f32(Lb[i])) + mn) - xs[i])
            best = f32(best + f32(w[i] * f32(d * d)))
        for step in range(21):
            isc = f32(f32(f32(f32(-1) + f32(f32(0.1) * f32(step))) + f32(15)) / f32(mx - mn))
            La = [max(0, min(15, _ni(f32(isc * f32(v - mn))))) for v in xs]
            sl = sl2 = sxl = f32(0)
            for i in range(32):
                wl = f32(w[i] * f32(La[i]))
                sl = f32(sl + wl)
                sl2 = f32(sl2 + f32(wl * f32(La[i])))
                sxl = f32(sxl + f32(wl * xs[i]))
            D = f32(f32(sw * sl2) - f32(sl * sl))
            if D > 0:
                ts = f32(f32(f32(sw * sxl) - f32(sx * sl)) / D)
                tm = f32(f32(f32(sl2 * sx) - f32(sl * sxl)) / D)
                if tm > 0:
                    tm, ts = f32(0), f32(sxl / sl2)
                cur = f32(0)
                for i in range(32):
                    d = f32(f32(f32(ts * f32(La[i])) + tm) - xs[i])
                    cur = f32(cur + f32(w[i] * f32(d * d)))
                if cur < best:
                    Lb, best, sc, mn = La, cur, ts, tm
        L[32 * j : 32 * j + 32] = Lb
        scales.append(sc)
        mins.append(f32(-mn))
    max_s = max([f32(0)] + [s for s in scales if s > 0])
    max_m = max([f32(0)] + [m for m in mins if m > 0])
    inv_s = f32(f32(63) / max_s) if max_s > 0 else f32(0)
    inv_m = f32(f32(63) / max_m) if max_m > 0 else f32(0)
    ls = [min(63, _ni(f32(inv_s * s)) & 0xFF) for s in scales]
    lm = [min(63, _ni(f32(inv_m * m)) & 0xFF) for m in mins]
    d_all, m_all = _h(f32(max_s / f32(63))), _h(f32(max_m / f32(63)))
    for j in range(8):
        d = f32(d_all * f32(ls[j]))
        if d == 0:
            continue
        dm = f32(m_all * f32(lm[j]))
        for i in range(32 * j, 32 * j + 32):
            L[i] = max(0, min(15, _ni(f32(f32(x[i] + dm) / d))))
    return d_all, m_all, ls, lm, L


def _scalar_q6_k_block(x: np.ndarray) -> tuple[np.float32, list[int], list[int]]:
    L = [0] * 256
    scales = []
    for ib in range(16):
        xs = [f32(v) for v in x[16 * ib : 16 * ib + 16]]
        amax, vmax = f32(0), f32(0)
        for v in xs:
            if abs(v) > amax:
                amax, vmax = abs(v), v
        if amax < f32(1e-15):
            scales.append(f32(0))
            continue

        def sums(isc):
            ls = [max(-32, min(31, _ni(f32(isc * v)))) for v in xs]
            slx = sl2 = f32(0)
            for v, li in zip(xs, ls):
                w = f32(v * v)
                slx = f32(slx + f32(f32(w * v) * f32(li)))
                sl2 = f32(sl2 + f32(f32(w * f32(li)) * f32(li)))
            return ls, slx, sl2

        lb, slx, sl2 = sums(f32(f32(-32) / vmax))
        sc = f32(slx / sl2) if sl2 != 0 else f32(0)
        best = f32(sc * slx)
        for step in range(-9, 10):
            if step == 0:
                continue
            la, slx, sl2 = sums(f32(-f32(f32(32) + f32(f32(0.1) * f32(step))) / vmax))
            if sl2 > 0 and f32(slx * slx) > f32(best * sl2):
                lb, sc = la, f32(slx / sl2)
                best = f32(sc * slx)
        L[16 * ib : 16 * ib + 16] = [li + 32 for li in lb]
        scales.append(sc)
    amax, smax = f32(0), f32(0)
    for s in scales:
        if abs(s) > amax:
            amax, smax = abs(s), s
    if amax < f32(1e-15):
        return f32(0), [0] * 16, [0] * 256
    isc = f32(f32(-128) / smax)
    d_all = _h(f32(f32(1) / isc))
    q_sc = [min(127, _ni(f32(isc * s))) for s in scales]
    for j in range(16):
        d = f32(d_all * f32(q_sc[j]))
        if d == 0:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = max(-32, min(31, _ni(f32(x[i] / d)))) + 32
    return d_all, q_sc, L


def _awkward_blocks(rng) -> np.ndarray:
    """Superblocks mixing the hard cases: zero / constant / single-value sub-blocks, a huge outlier,
    positive-only and negative-only data, ties, and a tiny scale."""
    g = rng.standard_normal((6, 256)).astype(np.float32)
    g[0, :32] = 0  # one zero sub-block of 32 (two of 16) in an otherwise normal block
    g[0, 64:96] = 0.5  # constant positive sub-block
    g[1, 100] = 1e4  # huge outlier
    g[2] = -np.abs(g[2])  # negative only
    g[3] = np.abs(g[3]) + 3  # positive only, offset
    g[4] = np.round(g[4] * 4) / 4  # many ties on a grid
    g[5] *= 1e-6  # small scale (fp16 subnormal range for d)
    return g


def test_q4_k_matches_scalar_port_on_awkward_blocks(rng):
    x = _awkward_blocks(rng)
    blocks = F.quantize(x, F.Q4_K).reshape(-1).view(F.BLOCK_DTYPES[F.Q4_K])
    for r in range(x.shape[0]):
        d, dm, ls, lm, L = _scalar_q4_k_block(x[r])
        b = blocks[r]
        sc, m = F.unpack_q4k_scales(b["scales"])
        assert b["d"] == np.float16(d).view(np.uint16) and b["dmin"] == np.float16(dm).view(np.uint16), r
        assert list(sc) == ls and list(m) == lm, r
        q = np.concatenate([b["qs"].reshape(4, 32) & 15, b["qs"].reshape(4, 32) >> 4], axis=1)
        assert list(q.reshape(-1)) == L, r


def test_q6_k_matches_scalar_port_on_awkward_blocks(rng):
    x = _awkward_blocks(rng)
    blocks = F.quantize(x, F.Q6_K).reshape(-1).view(F.BLOCK_DTYPES[F.Q6_K])
    for r in range(x.shape[0]):
        d, sc, L = _scalar_q6_k_block(x[r])
        b = blocks[r]
        assert b["d"] == np.float16(d).view(np.uint16), r
        assert list(b["scales"]) == sc, r
        # unpack the 6-bit levels with the dequantizer's layout: dequantize with d=1, scales=1
        unit = blocks[r : r + 1].copy()
        unit["d"] = np.float16(1).view(np.uint16)
        unit["scales"] = 1
        levels = F.dequantize(unit.view(np.uint8), F.Q6_K, (256,)) + 32
        assert list(levels.astype(int)) == L, r


# ------------------------------------------------------------------------------------------------
# round trips and awkward inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL, ids=NAMES.get)
def test_round_trip_sqnr_gaussian(qtype, rng):
    x = rng.standard_normal((32, 1024)).astype(np.float32)
    q = F.quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (32, F.row_bytes(qtype, 1024))
    s = F.sqnr_db(x, F.dequantize(q, qtype, x.shape))
    print(f"{NAMES[qtype]} round-trip SQNR {s:.2f} dB")
    assert s >= SQNR_MIN_DB[qtype]
    # scale invariance up to fp16 scale rounding: same quality at weight-like magnitudes
    y = x * np.float32(0.02)
    assert F.sqnr_db(y, F.dequantize(F.quantize(y, qtype), qtype, y.shape)) >= SQNR_MIN_DB[qtype]


@pytest.mark.parametrize("qtype", ALL, ids=NAMES.get)
def test_awkward_inputs(qtype, rng):
    cols = 512
    # all zeros -> exact zeros
    z = np.zeros((2, cols), np.float32)
    assert not F.dequantize(F.quantize(z, qtype), qtype, z.shape).any()
    # constant rows: close (within fp16 scale precision)
    c = np.full((2, cols), 0.37, np.float32)
    cd = F.dequantize(F.quantize(c, qtype), qtype, c.shape)
    assert np.isfinite(cd).all() and F.sqnr_db(c, cd) >= SQNR_MIN_DB[qtype]
    # negative-only
    n = -np.abs(rng.standard_normal((4, cols)).astype(np.float32))
    nd = F.dequantize(F.quantize(n, qtype), qtype, n.shape)
    assert F.sqnr_db(n, nd) >= SQNR_MIN_DB[qtype] - SQNR_BLOCK_SLACK_DB
    # one huge outlier: it survives, blocks without it keep their usual quality
    o = rng.standard_normal((2, cols)).astype(np.float32)
    o[1, 77] = 1e4
    od = F.dequantize(F.quantize(o, qtype), qtype, o.shape)
    assert np.isfinite(od).all()
    assert abs(od[1, 77] - 1e4) <= 1e4 * 0.01
    be = F.block_elems(qtype)
    clean = np.ones(cols // be, bool)
    clean[77 // be] = False
    ob, odb = o[1].reshape(-1, be)[clean], od[1].reshape(-1, be)[clean]
    assert F.sqnr_db(ob, odb) >= SQNR_MIN_DB[qtype] - SQNR_BLOCK_SLACK_DB
    assert F.sqnr_db(o[0], od[0]) >= SQNR_MIN_DB[qtype] - SQNR_BLOCK_SLACK_DB
    # one row, given 1-D or 2-D; rows are quantized independently
    r = rng.standard_normal(cols).astype(np.float32)
    q1 = F.quantize(r, qtype)
    assert q1.shape == (1, F.row_bytes(qtype, cols))
    assert np.array_equal(q1, F.quantize(r[None, :], qtype))
    both = F.quantize(np.stack([r, o[1]]), qtype)
    assert np.array_equal(both[0], q1[0]) and np.array_equal(both[1], F.quantize(o[1], qtype)[0])


@pytest.mark.parametrize("qtype", ALL, ids=NAMES.get)
def test_bad_inputs(qtype):
    be = F.block_elems(qtype)
    with pytest.raises(QuantShapeError):
        F.quantize(np.zeros((2, be + 16), np.float32), qtype)
    with pytest.raises(QuantShapeError):
        F.row_bytes(qtype, 0)
    good = F.quantize(np.ones((2, be), np.float32), qtype)
    with pytest.raises(QuantShapeError):
        F.dequantize(good.reshape(-1)[:-1], qtype, (2, be))
    with pytest.raises(QuantShapeError):
        F.dequantize(good, qtype, (3, be))
    with pytest.raises(QuantShapeError):
        F.dequantize(good, qtype, (2 * be + 16,))
    with pytest.raises(QuantShapeError):
        F.dequantize(good.view(np.int8), qtype, (2, be))
    with pytest.raises(QuantShapeError):
        F.QuantTensor(good[:1], qtype, (2, be))


def test_unknown_type_raises():
    for bad in (int(T.Q4_0), int(T.F16), int(T.Q5_K), 999):
        with pytest.raises(UnsupportedQuantError):
            F.quantize(np.zeros((1, 256), np.float32), bad)
        with pytest.raises(UnsupportedQuantError):
            F.dequantize(np.zeros(144, np.uint8), bad, (1, 256))
        with pytest.raises(UnsupportedQuantError):
            F.row_bytes(bad, 256)


def test_sqnr_db():
    x = np.array([1.0, -2.0, 3.0])
    assert F.sqnr_db(x, x) == float("inf")
    assert F.sqnr_db(x, x * 0) == pytest.approx(0.0)
    assert F.sqnr_db(x, x * 1.1) == pytest.approx(20.0)
    assert F.sqnr_db(np.zeros(3), x) == float("-inf")


def test_quantize_speed(rng):
    x = (rng.standard_normal((1408, 2048)) * 0.02).astype(np.float32)
    t0 = time.perf_counter()
    q = F.quantize(x, F.Q4_K)
    dt = time.perf_counter() - t0
    print(f"Q4_K quantize 1408x2048: {dt:.2f} s")
    assert q.shape == (1408, F.row_bytes(F.Q4_K, 2048))
    assert dt < QUANTIZE_SPEED_LIMIT_S


# ------------------------------------------------------------------------------------------------
# Q4_K_M recipe
# ------------------------------------------------------------------------------------------------


def _more_bits_layers(n: int) -> set[int]:
    # written out from llama.cpp's use_more_bits: first n/8, last n/8, every third in between
    return {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}


def test_q4_k_m_deepseek_v2_lite_like():
    n_layers, n_expert, hidden, expert_ff, dense_ff = 27, 64, 2048, 1408, 10944
    more = _more_bits_layers(n_layers)
    assert more == {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26}

    def t(name, cols, layer=None, **kw):
        return F.q4_k_m_type(name, n_layers, layer, cols, n_expert, **kw)

    for i in range(1, n_layers):
        # experts 1408 wide: ffn_down_exps rows are 1408 long -> Q4_K/Q6_K fall back to Q5_0/Q8_0
        assert t(f"blk.{i}.ffn_down_exps.weight", expert_ff) == (F.Q8_0 if i in more else F.Q5_0)
        assert t(f"blk.{i}.ffn_gate_exps.weight", hidden) == F.Q4_K
        assert t(f"blk.{i}.ffn_up_exps.weight", hidden) == F.Q4_K
        assert t(f"blk.{i}.ffn_down_shexp.weight", 2 * expert_ff) == (F.Q6_K if i in more else F.Q4_K)
        assert t(f"blk.{i}.ffn_gate_inp.weight", hidden) == F.F32  # router stays F32
        assert t(f"blk.{i}.exp_probs_b.bias", 64, n_dims=1) == F.F32
    for i in range(n_layers):
        assert t(f"blk.{i}.attn_kv_b.weight", 512) == (F.Q6_K if i in more else F.Q4_K)
        assert t(f"blk.{i}.attn_q.weight", hidden) == F.Q4_K
        assert t(f"blk.{i}.attn_output.weight", 2048) == F.Q4_K
        assert t(f"blk.{i}.attn_kv_a_mqa.weight", hidden) == F.Q4_K
        assert t(f"blk.{i}.attn_norm.weight", hidden, n_dims=1) == F.F32
        assert t(f"blk.{i}.attn_kv_a_norm.weight", 512, n_dims=1) == F.F32
    # dense first block: 10944 % 256 != 0 -> fallback, layer 0 gets more bits
    assert t("blk.0.ffn_down.weight", dense_ff) == F.Q8_0
    assert t("blk.0.ffn_gate.weight", hidden) == F.Q4_K
    assert t("output.weight", hidden) == F.Q6_K
    assert t("token_embd.weight", hidden) == F.Q4_K
    assert t("token_embd.weight", hidden, tied_embeddings=True) == F.Q6_K
    assert t("output_norm.weight", hidden, n_dims=1) == F.F32


def test_q4_k_m_mixtral_like():
    n_layers, n_expert, hidden, ff = 32, 8, 4096, 14336
    more = _more_bits_layers(n_layers)

    def t(name, cols, layer=None):
        return F.q4_k_m_type(name, n_layers, layer, cols, n_expert)

    for i in range(n_layers):
        assert t(f"blk.{i}.ffn_down_exps.weight", ff) == (F.Q6_K if i in more else F.Q4_K)
        assert t(f"blk.{i}.ffn_gate_exps.weight", hidden) == F.Q4_K
        assert t(f"blk.{i}.ffn_up_exps.weight", hidden) == F.Q4_K
        assert t(f"blk.{i}.attn_v.weight", hidden) == F.Q8_0  # n_expert == 8 rule
        assert t(f"blk.{i}.attn_k.weight", hidden) == F.Q8_0
        assert t(f"blk.{i}.attn_q.weight", hidden) == F.Q4_K
        assert t(f"blk.{i}.attn_output.weight", hidden) == int(T.Q5_K)
        assert t(f"blk.{i}.ffn_gate_inp.weight", hidden) == F.F32
    assert t("output.weight", hidden) == F.Q6_K


def test_q4_k_m_dense_and_fallbacks():
    n = 24
    more = _more_bits_layers(n)
    for i in range(n):
        want_v = F.Q6_K if i in more else F.Q4_K
        assert F.q4_k_m_type(f"blk.{i}.attn_v.weight", n, None, 1024) == want_v
        assert F.q4_k_m_type(f"blk.{i}.ffn_down.weight", n, i, 2816) == want_v
        assert F.q4_k_m_type(f"blk.{i}.attn_k.weight", n, None, 1024) == F.Q4_K
    # the caller's counter wins over the name (llama.cpp's i_ffn_down for dense models)
    assert F.q4_k_m_type("blk.5.ffn_down.weight", n, 0, 2816) == F.Q6_K
    # fallbacks: 256-blocks that do not fit -> 32-blocks; not even 32 -> F16
    assert F.q4_k_m_type("blk.3.ffn_up.weight", n, None, 96) == F.Q5_0
    assert F.q4_k_m_type("blk.0.ffn_down.weight", n, None, 96) == F.Q8_0
    assert F.q4_k_m_type("blk.3.ffn_up.weight", n, None, 100) == F.F16
    assert F.q4_k_m_type("output.weight", n, None, 96) == F.Q8_0
    assert F.q4_k_m_type("blk.3.ffn_up.bias", n, None, 256) == F.F32
    with pytest.raises(ModelConfigError):
        F.q4_k_m_type("ffn_down.weight", n, None, 256)
    with pytest.raises(ModelConfigError):
        F.q4_k_m_type("blk.40.ffn_down_exps.weight", n, None, 256, 64)
