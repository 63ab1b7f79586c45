"""The runtime's real GPU path, run on a host: emulate_gpu="triton" sends the GPU share of each
layer through the same code as on CUDA (pinned-or-not slot table -> gpu.moe_forward over the slot
arena, Triton kernels in the CPU interpreter) instead of the CPU kernels. Catches what the
CUDA-only branch of HybridRuntime.moe_begin gets wrong (slot table, dtypes, arena, accumulation
with the CPU share) without a GPU; the copy streams and events still need the GPU box
(tests/test_layer.py::test_cuda_runtime_matches_reference)."""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("a CUDA machine runs the real path (test_layer.py::test_cuda_runtime_matches_reference); "
                "this host-side stand-in needs Triton's interpreter", allow_module_level=True)
# Must precede the first import of triton anywhere in the process (read at @triton.jit time).
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton is not installed (pip install 'hybrimoe[gpu]')")

from hybrimoe.errors import HybrimoeError  # noqa: E402
from hybrimoe.layer import HybridRuntime, RuntimeConfig  # noqa: E402
from hybrimoe.scheduler import MODES  # noqa: E402

from test_layer import REL_TOL, _costs, _layers, _reference, _rel  # noqa: E402

# bf16 activations: the Triton path rounds x, the dequantized tiles and silu*up to bf16 (8
# significant bits) before its fp32 dot products (see gpu.moe_forward); the CPU share quantizes
# x to int8. Measured ~4e-3 here; a lost or doubled pair is >= 0.3.
BF16_REL_TOL = 2e-2


@pytest.mark.parametrize("mode", MODES)
def test_triton_gpu_path_matches_reference(tiny, tmp_path, mode):
    m, store = tiny
    rt = HybridRuntime(store, RuntimeConfig(cache_size=3, schedule=mode, emulate_gpu="triton", device="cpu",
                                            prefetch_size=2, cache_dir=str(tmp_path), prefetch_chunk_bytes=4096))
    assert rt.gpu_triton and not rt.gpu_real
    rt.set_costs(_costs(store))
    layers = _layers(m, store, rt)
    g = torch.Generator().manual_seed(3)
    n_tok = 0
    for T in (1, 19, 1):  # decode path, prefill path (> 16 tokens, not a multiple of the tile), decode
        n_tok += T
        for layer, mod in layers.items():
            x = torch.randn(T, m.config.hidden, generator=g)
            assert _rel(mod(x), _reference(m, store, layer, x)) < REL_TOL, (mode, T, layer)
    s = rt.summary()
    assert s["pairs_gpu"] + s["pairs_cpu"] == n_tok * m.config.top_k * len(store.layers)
    if mode in ("hybrid", "gpu-only", "kt-static"):
        assert s["pairs_gpu"] > 0  # the Triton kernels did compute part of the layer
    if mode == "cpu-only":
        assert s["pairs_gpu"] == 0


def test_triton_gpu_path_bf16_and_byte_budget(tiny, tmp_path):
    """bf16 hidden states (what a GPU model feeds the layer) and one slot pool shared by all
    layers (gpu_budget: slots padded to the largest expert)."""
    m, store = tiny
    slot = max(store.layout(layer).nbytes for layer in store.layers)
    rt = HybridRuntime(store, RuntimeConfig(gpu_budget=5 * slot, schedule="gpu-only", emulate_gpu="triton",
                                            device="cpu", cache_dir=str(tmp_path)))
    rt.set_costs(_costs(store))
    layers = _layers(m, store, rt)
    for T in (1, 18):
        x = torch.randn(T, m.config.hidden).bfloat16()
        for layer, mod in layers.items():
            y = mod(x)
            assert y.dtype == torch.bfloat16
            assert _rel(y.float(), _reference(m, store, layer, x.float())) < BF16_REL_TOL, (T, layer)
            assert rt.cache.occupancy_bytes() <= 5 * slot
    assert rt.summary()["pairs_gpu"] > 0


def test_emulate_gpu_value_is_checked(tiny, tmp_path):
    m, store = tiny
    with pytest.raises(HybrimoeError, match="emulate_gpu must be"):
        HybridRuntime(store, RuntimeConfig(emulate_gpu="cuda", device="cpu", cache_dir=str(tmp_path)))
    os.environ["TRITON_INTERPRET"], saved = "0", os.environ["TRITON_INTERPRET"]
    try:
        with pytest.raises(HybrimoeError, match="TRITON_INTERPRET=1"):
            HybridRuntime(store, RuntimeConfig(emulate_gpu="triton", device="cpu", cache_dir=str(tmp_path)))
    finally:
        os.environ["TRITON_INTERPRET"] = saved
