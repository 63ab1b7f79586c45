"""Dense layers that keep their GGUF blocks: the non-expert weights of a CPU-only run.

On a CPU-only machine the dense part of a MoE model (attention, shared experts, the dense first
layers, embeddings, the output head) dominates a decode step when it is dequantized to float32:
DeepSeek-V2-Lite has ~1.4 G non-expert weights, 5.6 GB of float32 read per token against ~0.8 GB
of activated Q4_K/Q5_0 experts. Kept as raw GGUF blocks (4.5-6.6 bits a weight) and run by the same
CPU kernels as the experts (`hybrimoe.cpu.gemm`, int8 activations on the integer tiers), they are
read at a fifth to a seventh of the bytes, as llama.cpp does.

    QuantLinear(qt, bias)   y = x @ W.T (+ bias); W a QuantTensor (Q4_K, Q6_K, Q5_0, Q8_0)
    QuantEmbedding(qt)      rows of W looked up and dequantized per call

Both expose `.weight` as the dequantized float32 matrix (computed on each access, for code that
reads weights directly, e.g. the reference MoE block); the forward pass never builds it.
Numerics: the `ref` CPU tier computes in float32 from the dequantized rows (equal to nn.Linear
on the dequantized weight up to summation order); the integer tiers quantize each token's
activations to 8 bits (relative output error ~0.5% rms, see hybrimoe.cpu).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import cpu as _cpu
from .formats import QuantTensor, dequantize, qtype_name


class QuantLinear(nn.Module):
    """Drop-in nn.Linear over raw GGUF blocks, computed on the CPU. forward(x (..., in)) -> (..., out)
    in x's dtype (float32 math inside). qt: QuantTensor (out_features, in_features)."""

    def __init__(self, qt: QuantTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.qt = qt
        self._prepared = _cpu.PreparedWeight(qt, "weight")  # checked once, not per call
        self.out_features, self.in_features = (int(d) for d in qt.shape)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight (built on each access; the forward never does)."""
        return torch.from_numpy(self.qt.dequantize())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        y = _cpu.gemm(self._prepared, x2)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={qtype_name(self.qt.qtype)}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """Drop-in nn.Embedding over raw GGUF blocks: forward(ids) dequantizes only the looked-up rows.
    qt: QuantTensor (num_embeddings, embedding_dim); dtype: output dtype."""

    def __init__(self, qt: QuantTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qt, self.dtype = qt, dtype
        self.num_embeddings, self.embedding_dim = (int(d) for d in qt.shape)

    @property
    def weight(self) -> torch.Tensor:
        return torch.from_numpy(self.qt.dequantize())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings}): found "
                             f"{int(flat.min())}..{int(flat.max())}")
        uniq, inv = np.unique(flat, return_inverse=True)
        rows = dequantize(np.ascontiguousarray(self.qt.data[uniq]), self.qt.qtype, (len(uniq), self.embedding_dim))
        out = torch.from_numpy(np.asarray(rows, np.float32)[inv])
        return out.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={qtype_name(self.qt.qtype)}"
