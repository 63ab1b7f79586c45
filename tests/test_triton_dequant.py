"""Triton dequantization (kernels/triton/dequant.py via hybrimoe.gpu.dequantize) against the numpy
reference formats.dequantize. Without CUDA the kernels run in Triton's CPU interpreter at small
shapes; on a GPU box the same tests run compiled, and the gpu-marked ones add real shapes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton anywhere in the process (read at @triton.jit time).
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'hybrimoe[gpu]')")

from gguf import quants  # noqa: E402

from hybrimoe import formats, gpu  # noqa: E402
from hybrimoe.errors import KernelInputError, QuantShapeError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = {"Q4_K": formats.Q4_K, "Q6_K": formats.Q6_K, "Q5_0": formats.Q5_0, "Q8_0": formats.Q8_0}
# Small shapes: 20 rows is not a multiple of the 16-row tile (masked rows); K-quants need 256-wide
# rows, Q5_0/Q8_0 get 160 (5 blocks: a partial 256-wide tile, masked columns).
SMALL_COLS = {formats.Q4_K: 512, formats.Q6_K: 512, formats.Q5_0: 160, formats.Q8_0: 160}


@pytest.fixture
def gen(rng):
    return torch.Generator(device="cpu").manual_seed(int(rng.integers(2**62)))


@pytest.mark.parametrize("name", TYPES)
def test_dequant_fp32_bit_exact(name, gen):
    # Random bytes hit every quant and scale bit pattern; the fp16 scales are sane.
    qtype = TYPES[name]
    rows, cols = 20, SMALL_COLS[qtype]
    raw = gpu.random_quant_rows(rows, cols, qtype, gen)
    want = formats.dequantize(raw.numpy(), qtype, (rows, cols))
    got = gpu.dequantize(raw.to(DEVICE), qtype, (rows, cols), torch.float32)
    assert got.shape == (rows, cols) and got.dtype == torch.float32
    # fp32 products of fp16 scales and small ints are exact or rounded once, as in numpy: bit-exact.
    np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("name", ["Q5_0", "Q8_0"])
def test_dequant_of_real_quantizer_output(name, rng):
    # Blocks written by gguf's own quantizer (realistic scales, one row = one block: 32 columns).
    qtype = TYPES[name]
    x = rng.standard_normal((9, 32)).astype(np.float32)
    raw = quants.quantize(x, qtype)
    want = quants.dequantize(raw, qtype).reshape(x.shape)
    got = gpu.dequantize(torch.from_numpy(raw).to(DEVICE), qtype, x.shape)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequant_half_outputs_round_like_torch(dtype, gen):
    # The kernel converts its exact fp32 value once: round to nearest even on the GPU, like torch's
    # .to(). Triton's CPU interpreter (numpy has no bfloat16) truncates fp32 -> bf16 instead.
    qtype = formats.Q6_K
    rows, cols = 17, 256
    raw = gpu.random_quant_rows(rows, cols, qtype, gen)
    exact = torch.from_numpy(formats.dequantize(raw.numpy(), qtype, (rows, cols)))
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        exact = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)  # interpreter: truncation
    want = exact.to(dtype)
    got = gpu.dequantize(raw.to(DEVICE).reshape(-1), qtype, (rows, cols), dtype)  # flat raw too
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), want)


def test_dequant_rejects_bad_input():
    raw = torch.zeros(3, 144, dtype=torch.uint8)
    with pytest.raises(QuantShapeError, match="144"):
        gpu.dequantize(raw, formats.Q4_K, (3, 512))  # 512 columns need 288 bytes per row
    with pytest.raises(QuantShapeError, match="block size"):
        gpu.dequantize(raw, formats.Q4_K, (3, 200))
    with pytest.raises(KernelInputError, match="qtype"):
        gpu.dequantize(raw, 2, (3, 256))  # Q4_0 is not an expert format here
    with pytest.raises(KernelInputError, match="dtype"):
        gpu.dequantize(raw, formats.Q4_K, (3, 256), torch.int8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,rows,cols", [
    ("Q4_K", 1408, 2048),   # DeepSeek-V2-Lite gate/up
    ("Q5_0", 2048, 1408),   # DeepSeek-V2-Lite down (1408 is not a multiple of 256)
    ("Q8_0", 2048, 1408),
    ("Q6_K", 4096, 14336),  # Mixtral down
])
def test_dequant_real_shapes_gpu(name, rows, cols):
    qtype = TYPES[name]
    gen = torch.Generator(device="cuda").manual_seed(int(np.random.SeedSequence().entropy % 2**62))
    raw = gpu.random_quant_rows(rows, cols, qtype, gen, device="cuda")
    got = gpu.dequantize(raw, qtype, (rows, cols))
    want = formats.dequantize(raw.cpu().numpy(), qtype, (rows, cols))
    np.testing.assert_array_equal(got.cpu().numpy(), want)


# ----------------------------------------------------------------------------- CUDA second opinion
def test_cuda_q4k_gemv_compiles(tmp_path):
    # kernels/cuda/q4k_gemv.cu builds for Hopper against the shared block header (blocks.h).
    import subprocess

    nvcc = gpu.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): needs the CUDA toolkit")
    cu, inc = gpu._cuda_sources()
    cmd = [nvcc, "-c", "-O3", "-arch=sm_90", "-I", str(inc), str(cu), "-o", str(tmp_path / "q4k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_q4k_gemv_matches_reference_gpu():
    if gpu.find_nvcc() is None:
        pytest.skip("nvcc not found: the CUDA GEMV is compiled at first use")
    rows, cols = 1408, 2048  # DeepSeek-V2-Lite gate
    gen = torch.Generator(device="cuda").manual_seed(int(np.random.SeedSequence().entropy % 2**62))
    raw = gpu.random_quant_rows(rows, cols, formats.Q4_K, gen, device="cuda")
    x = torch.randn(cols, device="cuda", generator=gen)
    y = gpu.cuda_q4k_gemv(raw, x, rows, cols)
    w = torch.from_numpy(formats.dequantize(raw.cpu().numpy(), formats.Q4_K, (rows, cols))).double()
    ref = w @ x.cpu().double()
    # fp32 accumulation over 2048 terms in a different order: ~1e-6 normwise.
    err = (torch.linalg.vector_norm(y.cpu().double() - ref) / torch.linalg.vector_norm(ref)).item()
    assert err <= 1e-5
