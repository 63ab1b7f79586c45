"""CPU kernels (hybrimoe.cpu / hybrimoe._cpu) against the numpy/torch references, every tier.

Tolerances are relative (NMSE = ||y - y_ref||^2 / ||y_ref||^2):
  * ref tier: float dequantization (the formats.dequantize formulas) and a double accumulator,
    rounded once to float32 -> NMSE ~ 1e-13 (the FFN reference itself runs in float32);
    NMSE_REF allows float32 rounding only.
  * integer tiers: activations are quantized per token to int8 with scale amax/127 per block
    (256 for K-quant weights, 32 for Q5_0/Q8_0). Rounding error is uniform in +-d/2, variance
    d^2/12, so the relative activation error is (amax/rms / 127)^2 / 12: 2.5e-5 .. 8e-5 for
    Gaussian blocks (amax 2.2 .. 4 rms), and the output NMSE is about the same number; for one
    token (2 blocks of 256) it fluctuates: over 200-300 fresh draws of the GEMV case per type
    and tier, median 5e-5, max 1.6e-4 (Q4_K, generic) -> NMSE_INT8_ACT = 5e-4.
  * fused FFN, integer tiers: two quantized activations, x and then h = silu(g) * u, a product
    with heavy tails (one 256-block of h can have amax ~ 10-15 rms: up to 1e-3 from h alone).
    Over 300 draws of the one-token case: median 2.2e-4, p99 6.9e-4, max 1.2e-3 -> 3e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

from hybrimoe import cpu, formats as F, synth
from hybrimoe.errors import KernelInputError

torch = pytest.importorskip("torch")

NMSE_REF = 1e-9
NMSE_INT8_ACT = 5e-4
NMSE_INT8_FFN = 3e-3
W_STD = 0.05  # weight std of the random blocks (keeps outputs O(1) for unit activations)

# Forced variants: "generic-scalar" = the generic tier's portable C++ (what runs without AVX2),
# "avx512-novnni" = the avx512 tier without VNNI (maddubs + madd, Skylake-X class).
TIERS = ["ref", "generic", "generic-scalar", "avx512", "avx512-novnni"]


@pytest.fixture(autouse=True)
def _ext_state():
    if not cpu.available():
        pytest.skip("hybrimoe._cpu is not built (pip install --no-build-isolation -e .)")
    tier, threads = cpu.tier(), cpu.num_threads()
    yield
    cpu._ext()._set_generic_scalar(False)
    cpu._ext()._set_avx512_no_vnni(False)
    cpu.set_tier(tier)
    cpu.set_num_threads(threads)


def use_tier(name: str) -> None:
    if name == "generic-scalar":
        cpu._ext()._set_generic_scalar(True)
        name = "generic"
    if name == "avx512-novnni":
        cpu._ext()._set_avx512_no_vnni(True)
        name = "avx512"
    if name not in cpu.available_tiers():
        pytest.skip(f"tier {name} is not available on this CPU")
    cpu.set_tier(name)


def nmse(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((y - ref) ** 2) / np.sum(ref**2))


def qtensor(qtype, rows, cols, rng) -> F.QuantTensor:
    return F.QuantTensor(synth.random_blocks(qtype, rows, cols, W_STD, rng), qtype, (rows, cols))


def tol(tier: str, ffn: bool = False) -> float:
    if tier == "ref":
        return NMSE_REF
    return NMSE_INT8_FFN if ffn else NMSE_INT8_ACT


# ------------------------------------------------------------------------------------ tiers ---


def test_tier_selection():
    tiers = cpu.available_tiers()
    assert tiers[:2] == ["ref", "generic"]
    assert cpu.tier() in tiers
    for t in tiers:
        cpu.set_tier(t)
        assert cpu.tier() == t
    with pytest.raises(ValueError, match="not available"):
        cpu.set_tier("amx")
    assert cpu.num_threads() >= 1


# ------------------------------------------------------------------------------------- GEMM ---

# cols: 512 = 2 super-blocks; 352 = 11 blocks of 32 (Q5_0/Q8_0 only, an odd block count).
COLS = {F.Q4_K: 512, F.Q6_K: 512, F.Q5_0: 352, F.Q8_0: 352}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("qtype", F.EXPERT_QTYPES, ids=F.qtype_name)
@pytest.mark.parametrize(
    "T",
    [
        1,  # GEMV path (token tile of 1)
        3,  # small GEMM, one partial tile
        7,  # small GEMM, partial tile on AVX2 (4) and AVX-512 (8)
        133,  # prefill: 16 tiles of 8 + 5, not a multiple of any tile
    ],
)
def test_gemm_vs_reference(tier, qtype, T, rng):
    use_tier(tier)
    rows = 83  # not a multiple of the 16-row task chunk
    W = qtensor(qtype, rows, COLS[qtype], rng)
    x = rng.standard_normal((T, COLS[qtype])).astype(np.float32)
    y = cpu.gemm(W, x)
    assert y.shape == (T, rows) and y.dtype == np.float32
    assert nmse(y, cpu.gemm_ref(W, x)) < tol(tier)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("qtype", [F.Q5_0, F.Q8_0], ids=F.qtype_name)
@pytest.mark.parametrize(
    "cols",
    [
        32,  # a single block per row
        96,  # 3 blocks: odd count, no 64-wide vector covers a row exactly
        128,  # 4 blocks
    ],
)
def test_gemm_q5_0_q8_0_short_rows(tier, qtype, cols, rng):
    use_tier(tier)
    W = qtensor(qtype, 37, cols, rng)
    for T in (1, 8, 11):  # GEMV, one full tile of 8, a tile and a remainder
        x = rng.standard_normal((T, cols)).astype(np.float32)
        assert nmse(cpu.gemm(W, x), cpu.gemm_ref(W, x)) < tol(tier)


def test_gemm_1d_torch_bf16_and_threads(rng):
    W = qtensor(F.Q4_K, 64, 512, rng)
    xb = torch.randn(5, 512).to(torch.bfloat16)
    y_bf16 = cpu.gemm(W, xb)
    assert isinstance(y_bf16, torch.Tensor) and y_bf16.dtype == torch.float32
    # bf16 -> f32 is exact, so the kernel sees the same activations: identical results
    y_f32 = cpu.gemm(W, xb.float().numpy())
    np.testing.assert_array_equal(y_bf16.numpy(), y_f32)
    np.testing.assert_array_equal(cpu.gemm(W, xb.float().numpy()[2]), y_f32[2])  # 1-D x: GEMV
    # every output row is computed by exactly one task: thread count cannot change the bits
    cpu.set_num_threads(1)
    np.testing.assert_array_equal(cpu.gemm(W, xb.float().numpy()), y_f32)
    cpu.set_num_threads(3)  # more threads than cores still works
    np.testing.assert_array_equal(cpu.gemm(W, xb.float().numpy()), y_f32)


def test_gemm_rejects_bad_inputs(rng):
    W = qtensor(F.Q4_K, 32, 256, rng)
    with pytest.raises(KernelInputError, match=r"x: last dimension.*expected 256, found 512"):
        cpu.gemm(W, np.zeros((2, 512), np.float32))
    with pytest.raises(KernelInputError, match=r"x: has the wrong dtype.*float64"):
        cpu.gemm(W, np.zeros((2, 256)))
    with pytest.raises(KernelInputError, match=r"out: .*expected float32 \(2, 32\)"):
        cpu.gemm(W, np.zeros((2, 256), np.float32), out=np.zeros((2, 31), np.float32))
    bad = F.QuantTensor(W.data, F.Q4_K, (32, 256))
    object.__setattr__(bad, "qtype", 2)  # Q4_0: not an expert format here
    with pytest.raises(KernelInputError, match=r"qt: has an unsupported quant type"):
        cpu.gemm(bad, np.zeros((2, 256), np.float32))


# ---------------------------------------------------------------------------------- MoE FFN ---

H = 512


def mixed_layer(rng):
    """Five experts with every type mix the Q4_K_M recipe produces, and two inter widths."""
    spec = [
        (F.Q4_K, F.Q4_K, F.Q5_0, 352),  # DSv2-Lite-like: Q4_K gate/up, Q5_0 down, inter % 256 != 0
        (F.Q4_K, F.Q4_K, F.Q6_K, 512),  # Mixtral-like: Q6_K down
        (F.Q8_0, F.Q8_0, F.Q8_0, 352),  # Q8_0 everywhere
        (F.Q6_K, F.Q4_K, F.Q4_K, 256),  # gate and up of different types
        (F.Q4_K, F.Q4_K, F.Q5_0, 352),  # gets no tokens in most cases
    ]
    return [(qtensor(g, i, H, rng), qtensor(u, i, H, rng), qtensor(d, H, i, rng)) for g, u, d, i in spec]


def routing(case, T, E, rng):
    if case == "uneven":  # random top-2, expert 4 never chosen
        ids = np.stack([rng.choice(E - 1, 2, replace=False) for _ in range(T)])
        toks = [np.nonzero((ids == e).any(1))[0].astype(np.int32) for e in range(E)]
    elif case == "all_on_one":  # every token on expert 1, the others empty
        toks = [np.arange(T, dtype=np.int64) if e == 1 else np.zeros(0, np.int64) for e in range(E)]
    else:  # "one_token": T == 1 on three experts (GEMV path in both phases)
        toks = [np.array([0], np.int64) if e in (0, 2, 3) else np.zeros(0, np.int64) for e in range(E)]
    wts = [rng.uniform(0.1, 1.0, len(t)).astype(np.float32) for t in toks]
    return toks, wts


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(
    "case,T",
    [
        ("one_token", 1),  # decode: 1 token, 3 experts
        ("uneven", 19),  # few tokens, uneven counts, an empty expert
        ("all_on_one", 37),  # one expert takes every token, the rest are empty
        ("uneven", 150),  # prefill-sized, tiles of 8 plus remainders
    ],
)
def test_moe_ffn_vs_reference(tier, case, T, rng):
    use_tier(tier)
    experts = mixed_layer(rng)
    toks, wts = routing(case, T, len(experts), rng)
    x = rng.standard_normal((T, H)).astype(np.float32)
    out = cpu.moe_ffn(x, experts, toks, wts)
    ref = cpu.moe_ffn_ref(x, experts, toks, wts).numpy()
    assert out.shape == (T, H) and out.dtype == np.float32
    assert nmse(out, ref) < tol(tier, ffn=True)


def test_moe_ffn_accumulates_is_deterministic_and_takes_bf16(rng):
    experts = mixed_layer(rng)
    toks, wts = routing("uneven", 23, len(experts), rng)
    xb = torch.randn(23, H).to(torch.bfloat16)
    x = xb.float().numpy()
    base = cpu.moe_ffn(x, experts, toks, wts)
    # torch bf16 in, torch f32 out, same bits as the f32 copy of the same values
    yb = cpu.moe_ffn(xb, experts, toks, wts)
    assert isinstance(yb, torch.Tensor)
    np.testing.assert_array_equal(yb.numpy(), base)
    # out is accumulated into
    init = rng.standard_normal((23, H)).astype(np.float32)
    acc = cpu.moe_ffn(x, experts, toks, wts, out=init.copy())
    np.testing.assert_allclose(acc, init + base, rtol=1e-6, atol=1e-6)
    # fixed summation order: 1 thread and 2 threads give the same bits
    cpu.set_num_threads(1)
    np.testing.assert_array_equal(cpu.moe_ffn(x, experts, toks, wts), base)
    cpu.set_num_threads(2)
    np.testing.assert_array_equal(cpu.moe_ffn(x, experts, toks, wts), base)


def test_prepared_weights_and_experts_equal_the_plain_ones(rng):
    """PreparedWeight / PreparedExpert (checked once, reused per call) give the same bits."""
    w = qtensor(F.Q6_K, 40, 512, rng)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    np.testing.assert_array_equal(cpu.gemm(cpu.PreparedWeight(w), x), cpu.gemm(w, x))
    experts = mixed_layer(rng)
    toks, wts = routing("uneven", 11, len(experts), rng)
    x = rng.standard_normal((11, H)).astype(np.float32)
    prepared = [cpu.PreparedExpert(*ex) for ex in experts]
    np.testing.assert_array_equal(cpu.moe_ffn(x, prepared, toks, wts), cpu.moe_ffn(x, experts, toks, wts))
    with pytest.raises(KernelInputError, match=r"experts\[0\].gate: has the wrong shape"):
        cpu.moe_ffn(np.zeros((2, 256), np.float32), prepared[:1], toks[:1], wts[:1])
    with pytest.raises(KernelInputError, match=r"expert.down: has the wrong shape"):
        cpu.PreparedExpert(experts[0][0], experts[0][1], experts[1][0])


def test_moe_ffn_rejects_bad_inputs(rng):
    experts = mixed_layer(rng)[:2]
    toks = [np.array([0, 1]), np.array([1])]
    wts = [np.ones(2, np.float32), np.ones(1, np.float32)]
    x = np.zeros((2, H), np.float32)
    with pytest.raises(KernelInputError, match=r"experts\[1\].down: has the wrong shape"):
        cpu.moe_ffn(x, [experts[0], (experts[1][0], experts[1][1], experts[0][2])], toks, wts)
    with pytest.raises(KernelInputError, match=r"weights\[0\]: must have one weight per token id"):
        cpu.moe_ffn(x, experts, toks, [np.ones(3, np.float32), wts[1]])
    with pytest.raises(KernelInputError, match=r"experts\[0\].gate: has the wrong shape.*\(\d+, 256\)"):
        cpu.moe_ffn(np.zeros((2, 256), np.float32), experts, toks, wts)
    with pytest.raises(KernelInputError, match=r"token_ids\[1\]: has the wrong dtype"):
        cpu.moe_ffn(x, experts, [toks[0], np.array([0.5])], wts)
    with pytest.raises(KernelInputError, match=r"token_ids/weights: need one entry per expert"):
        cpu.moe_ffn(x, experts, toks[:1], wts[:1])
    # token ids are range-checked inside the job: a ValueError, and out is untouched
    out = np.zeros((2, H), np.float32)
    with pytest.raises(ValueError, match=r"token_ids\[1\]\[0\] = 2 is out of range \[0, 2\)"):
        cpu.moe_ffn(x, experts, [toks[0], np.array([2])], wts, out=out)
    assert not out.any()


# ------------------------------------------------------------------------------------ async ---


def test_submit_then_wait_equals_sync(rng):
    experts = mixed_layer(rng)
    jobs = []
    for T in (1, 9, 40):
        toks, wts = routing("uneven" if T > 1 else "one_token", T, len(experts), rng)
        x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
        jobs.append((x, toks, wts, cpu.moe_ffn_submit(x, experts, toks, wts)))
    for x, toks, wts, h in reversed(jobs):  # wait out of order
        y = h.wait()
        assert h.done()
        assert isinstance(y, torch.Tensor)
        np.testing.assert_array_equal(y.numpy(), cpu.moe_ffn(x, experts, toks, wts).numpy())
    # a handle dropped without wait(): its destructor waits for the job (which reads buffers the
    # handle keeps alive) instead of freeing them under it
    x, toks, wts, _ = jobs[-1]
    cpu.moe_ffn_submit(x, experts, toks, wts)
    np.testing.assert_array_equal(cpu.moe_ffn(x, experts, toks, wts).numpy(), jobs[-1][3].wait().numpy())


def test_submit_returns_before_the_job_ends(rng):
    """submit queues the job and returns: the job is still running when it returns (a job of
    ~10^8 multiply-adds takes tens of ms; returning takes microseconds), and Python code runs
    meanwhile. (A Handle returned by copy made submit wait for the whole job with the GIL held.)"""
    experts = mixed_layer(rng)
    T = 512
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
    toks = [np.arange(T, dtype=np.int64)] * len(experts)
    wts = [np.full(T, 0.5, np.float32)] * len(experts)
    h = cpu.moe_ffn_submit(x, experts, toks, wts)
    assert not h.done(), "moe_ffn_submit returned only after its job had finished"
    spins = 0
    while not h.done():  # Python keeps running while the pool computes
        spins += 1
    assert spins > 0
    np.testing.assert_array_equal(h.wait().numpy(), cpu.moe_ffn(x, experts, toks, wts).numpy())


def test_error_in_worker_raises_at_wait(rng):
    experts = mixed_layer(rng)[:2]
    x = rng.standard_normal((4, H)).astype(np.float32)
    bad = cpu.moe_ffn_submit(x, experts, [np.array([0, 9]), np.array([1])], [np.ones(2), np.ones(1)])
    with pytest.raises(ValueError, match=r"token_ids\[0\]\[1\] = 9 is out of range"):
        bad.wait()
    # the pool is still usable afterwards, and a negative id is caught the same way
    good = cpu.moe_ffn_submit(x, experts, [np.array([0, 3]), np.array([1])], [np.ones(2), np.ones(1)])
    assert good.wait().shape == (4, H)
    with pytest.raises(ValueError, match="out of range"):
        cpu.moe_ffn_submit(x, experts, [np.array([-1]), np.array([1])], [np.ones(1), np.ones(1)]).wait()


@pytest.mark.parametrize("scalar", [False, True], ids=["simd", "portable"])
def test_read_sum_reads_every_byte_once(rng, scalar):
    """The read ceiling of microbench/cpu_kernels.py must read the whole buffer: its result is the
    buffer's 64-bit words summed (mod 2^64), over chunk boundaries and several threads."""
    cpu._ext()._set_generic_scalar(scalar)
    for threads in (1, 2):
        cpu.set_num_threads(threads)
        for n in (128, 256 << 10, 3 * (256 << 10) + 128 * 7):
            b = rng.integers(0, 256, n, dtype=np.uint8)
            want = int(b.view(np.uint64).sum(dtype=np.uint64))
            assert cpu._ext()._read_sum(b.ctypes.data, n) == want
            b[n - 1] ^= 1  # the last byte counts too
            assert cpu._ext()._read_sum(b.ctypes.data, n) != want
