"""Native decode-step helpers (hybrimoe.cpu.attend_one, rms_norm) against their torch twins, and the
CPU decode attention backend that uses them."""

import pytest
import torch

from hybrimoe import cpu
from hybrimoe.errors import KernelInputError

pytestmark = pytest.mark.skipif(not cpu.available(), reason="hybrimoe._cpu not built")

# float32 kernels vs float32 torch: different summation orders only
ATOL, RTOL = 2e-5, 2e-5


def _ref(q, k, v, scale, mask=None):
    B, H, _, _ = q.shape
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    p = torch.softmax(s, -1)
    p = torch.nan_to_num(p, nan=0.0)  # all-masked rows: zeros, as the kernel gives
    return p @ v


@pytest.mark.parametrize("B,H,Hkv,S,dk,dv", [(1, 16, 16, 64, 192, 128), (2, 8, 2, 37, 72, 40), (1, 4, 1, 1, 8, 8),
                                             (3, 6, 3, 300, 13, 5)])
def test_attend_one_matches_torch_on_strided_cache(B, H, Hkv, S, dk, dv):
    g = torch.Generator().manual_seed(S * 7 + dk)
    q = torch.randn(B, H, 1, dk, generator=g)
    # keys/values as views of a (B, cap, Hkv, d) buffer, as hybrimoe.mla keeps them
    kbuf = torch.randn(B, S + 5, Hkv, dk, generator=g)
    vbuf = torch.randn(B, S + 3, Hkv, dv, generator=g)
    k, v = kbuf[:, :S].transpose(1, 2), vbuf[:, :S].transpose(1, 2)
    assert S == 1 or not k.is_contiguous()
    scale = dk ** -0.5
    got = cpu.attend_one(q, k, v, scale)
    torch.testing.assert_close(got, _ref(q, k, v, scale), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("path", ["generic", "portable", "ref"])
def test_attend_one_every_code_path(path):
    """The AVX2 loops (generic / avx512 tiers on an AVX2 CPU) and the portable ones (ref tier, or the
    generic tier's portable-code testing aid) agree with torch."""
    if path == "generic" and not cpu._ext().cpu_features()["avx2"]:
        pytest.skip("no AVX2 on this CPU")
    old_tier = cpu.tier()
    try:
        cpu.set_tier("ref" if path == "ref" else "generic")
        cpu._ext()._set_generic_scalar(path == "portable")
        g = torch.Generator().manual_seed(21)
        for (H, Hkv, S, dk, dv) in [(16, 16, 65, 192, 128), (4, 2, 7, 37, 70), (2, 1, 3, 5, 3)]:
            q, k, v = (torch.randn(2, H, 1, dk, generator=g), torch.randn(2, Hkv, S, dk, generator=g),
                       torch.randn(2, Hkv, S, dv, generator=g))
            torch.testing.assert_close(cpu.attend_one(q, k, v, 0.2), _ref(q, k, v, 0.2), atol=ATOL, rtol=RTOL)
    finally:
        cpu._ext()._set_generic_scalar(False)
        cpu.set_tier(old_tier)


def test_attend_one_masks_additive_per_head_and_all_masked():
    g = torch.Generator().manual_seed(3)
    B, H, S, d = 2, 4, 9, 16
    q, k, v = torch.randn(B, H, 1, d, generator=g), torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d,
                                                                                                        generator=g)
    m = torch.randn(B, H, 1, S, generator=g)
    m[0, 1, 0, :4] = float("-inf")
    m[1, 2, 0, :] = float("-inf")  # a row with nothing to attend to: zeros
    got = cpu.attend_one(q, k, v, 0.3, m)
    torch.testing.assert_close(got, _ref(q, k, v, 0.3, m), atol=ATOL, rtol=RTOL)
    assert torch.count_nonzero(got[1, 2]) == 0
    m1 = torch.zeros(B, 1, 1, S)
    m1[:, :, :, -2:] = float("-inf")  # broadcast over heads
    torch.testing.assert_close(cpu.attend_one(q, k, v, 0.3, m1), _ref(q, k, v, 0.3, m1), atol=ATOL, rtol=RTOL)


def test_attend_one_rejects_bad_input_by_name():
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(KernelInputError, match="query"):
        cpu.attend_one(torch.randn(1, 4, 2, 8), k, k, 1.0)
    with pytest.raises(KernelInputError, match="key"):
        cpu.attend_one(q, torch.randn(1, 3, 5, 8), k, 1.0)
    with pytest.raises(KernelInputError, match="value"):
        cpu.attend_one(q, k, torch.randn(1, 4, 6, 8), 1.0)
    with pytest.raises(KernelInputError, match="mask"):
        cpu.attend_one(q, k, k, 1.0, torch.zeros(1, 1, 1, 4))
    with pytest.raises(KernelInputError, match="float32"):
        cpu.attend_one(q.double(), k, k, 1.0)
    with pytest.raises(KernelInputError, match="contiguous"):
        cpu.attend_one(q, torch.randn(1, 4, 8, 5).transpose(-1, -2), k, 1.0)


@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 512), (2, 5, 7)])
def test_rms_norm_matches_the_transformers_formula(shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-6), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(KernelInputError, match="weight"):
        cpu.rms_norm(x, torch.ones(shape[-1] + 1), 1e-6)


def test_decode_backend_native_equals_matmul_path():
    """The backend's native call and its torch path agree (bool mask, grouped heads)."""
    from hybrimoe import cpu_attention as ca

    g = torch.Generator().manual_seed(11)
    B, H, Hkv, S, d = 1, 8, 2, 33, 24
    q, k, v = torch.randn(B, H, 1, d, generator=g), torch.randn(B, Hkv, S, d, generator=g), torch.randn(B, Hkv, S, d,
                                                                                                          generator=g)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[..., 3:7] = False
    got, _ = ca.cpu_decode_attention(None, q, k, v, mask, scaling=0.25)
    ref = _ref(q, k, v, 0.25, torch.zeros(B, 1, 1, S).masked_fill(~mask, float("-inf")))
    torch.testing.assert_close(got, ref.reshape(B, 1, H, d), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2moe", "tiny-qwen3moe", "tiny-mixtral", "tiny-olmoe"])
def test_native_rms_norm_modules_match_their_own_forward(preset, tmp_path):
    """Every RMSNorm of each family's loaded CPU model is switched, and gives its own forward's
    result (float32 rounding); a bf16 input still takes the module's own path."""
    from hybrimoe import synth
    from hybrimoe.cpu_step import RMS_NORM_CLASSES
    from hybrimoe.models import load_gguf_model

    model, _, _ = load_gguf_model(synth.write_gguf(synth.PRESETS[preset], tmp_path / "m.gguf"), progress=False)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(type(m).__name__ in RMS_NORM_CLASSES for m in norms)
    g = torch.Generator().manual_seed(5)
    for m in norms:
        assert getattr(m.forward, "hybrimoe_native", False)
        x = torch.randn(2, 3, m.weight.shape[0], generator=g) * 2
        torch.testing.assert_close(m(x), type(m).forward(m, x), atol=1e-5, rtol=1e-5)
        xb = x.bfloat16()
        assert torch.equal(m(xb), type(m).forward(m, xb))


def test_moe_ffn_table_rejects_bad_input_by_name():
    import numpy as np

    x = torch.zeros(1, 8)
    desc = np.zeros(1, cpu.JOB_EXPERT_DTYPE)
    with pytest.raises(KernelInputError, match="x"):
        cpu.moe_ffn_table(x.double(), desc, torch.zeros(1, 8))
    with pytest.raises(KernelInputError, match="desc"):
        cpu.moe_ffn_table(x, np.zeros((1, 11), np.int64), torch.zeros(1, 8))
    with pytest.raises(KernelInputError, match="out"):
        cpu.moe_ffn_table(x, desc, torch.zeros(2, 8))
