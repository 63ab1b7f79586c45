"""Incremental key/value expansion for DeepSeek-V2 multi-head latent attention (MLA) on the CPU.

transformers' `DeepseekV2Attention` caches the compressed latents (kv_lora_rank + rope dims per
token) and, at every decode step, re-expands the WHOLE cache through `kv_b_proj` (`expand_kv`):
2.1 M multiply-adds per cached token and layer for DeepSeek-V2-Lite, so on a CPU a decode step
grows with the context (measured: 18 ms/token at 16 tokens of context, 95 ms at 512, 5-layer
DSv2-Lite-shaped model, 2 cores). The expansion is row-wise: the expanded keys and values of a
position depend on that position's latent alone. So the expansion of the part of the cache
already seen can be kept and only the new positions expanded.

`memoize_expand_kv(model)` wraps each DeepSeek-V2 attention's `expand_kv`. Each call checks that
the latents it expanded before are still the prefix of the ones it is given (an exact compare,
~1/4000 of re-expanding them); if so it expands only the new positions into a growing buffer,
else (a new sequence, a cropped or reordered cache, another batch size) it starts over. Results
are those of `expand_kv` on the new rows, written into the buffer: the same values, by the same
module (a fresh Linear call per step on fewer rows; float summation order per row can differ
from one call on all rows only where the backend's GEMM blocking depends on the row count).

Memory: the expanded keys and values, (heads * (nope + rope + v)) floats per token and layer
(DSv2-Lite float32: 20 KiB), plus a copy of the latents. Meant for CPU runs; on a GPU the
re-expansion is cheap and the memory better spent on the expert cache.
"""

from __future__ import annotations

import torch
from torch import nn


class _ExpandKVMemo:
    """expand_kv(kv_nope (B, 1, S, R), k_rot (B, 1, S, r)) -> (keys (B, H, S, dk), values (B, H, S, dv)),
    computed for new positions only (see the module docstring)."""

    def __init__(self, expand):
        self.expand = expand  # the module's own expand_kv (bound method)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.latent = self.rot = None  # copies of the latents expanded so far, (B, 1, n, .)
        self.kbuf = self.vbuf = None  # (B, capacity, H, d): [:, :n] is the expansion of positions 0..n-1

    def _same_prefix(self, kv_nope: torch.Tensor, k_rot: torch.Tensor) -> bool:
        if self.latent is None or kv_nope.shape[2] < self.n:
            return False
        if kv_nope.shape[:2] != self.latent.shape[:2] or kv_nope.dtype != self.latent.dtype \
                or kv_nope.device != self.latent.device:
            return False
        return bool(torch.equal(kv_nope[:, :, :self.n], self.latent)
                    and torch.equal(k_rot[:, :, :self.n], self.rot))

    def __call__(self, kv_nope: torch.Tensor, k_rot: torch.Tensor):
        S = kv_nope.shape[2]
        if not self._same_prefix(kv_nope, k_rot):
            self.reset()
        n = self.n
        if S > n:
            k_new, v_new = self.expand(kv_nope[:, :, n:], k_rot[:, :, n:])  # (B, H, S - n, d)
            B, H = k_new.shape[:2]
            if self.kbuf is None or self.kbuf.shape[1] < S:
                cap = max(S, 2 * (self.kbuf.shape[1] if self.kbuf is not None else 0), 64)
                kbuf = k_new.new_empty(B, cap, H, k_new.shape[-1])
                vbuf = v_new.new_empty(B, cap, H, v_new.shape[-1])
                if n:
                    kbuf[:, :n] = self.kbuf[:, :n]
                    vbuf[:, :n] = self.vbuf[:, :n]
                self.kbuf, self.vbuf = kbuf, vbuf
            self.kbuf[:, n:S] = k_new.transpose(1, 2)
            self.vbuf[:, n:S] = v_new.transpose(1, 2)
            self.latent = kv_nope.detach().clone()
            self.rot = k_rot.detach().clone()
            self.n = S
        # views (B, H, S, d), like expand_kv's own (non-contiguous) value states
        return self.kbuf[:, :S].transpose(1, 2), self.vbuf[:, :S].transpose(1, 2)


def memoize_expand_kv(model: nn.Module) -> int:
    """Wrap `expand_kv` of every module of `model` that has one (DeepSeek-V2 MLA attention);
    returns how many were wrapped. Idempotent."""
    n = 0
    for mod in model.modules():
        fn = getattr(mod, "expand_kv", None)
        if fn is None or isinstance(fn, _ExpandKVMemo):
            continue
        mod.expand_kv = _ExpandKVMemo(fn)  # instance attribute: shadows the class method
        n += 1
    return n
