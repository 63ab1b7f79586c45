"""Incremental key/value expansion for DeepSeek-V2 multi-head latent attention (MLA) on the CPU.

transformers' `DeepseekV2Attention` caches the compressed latents (kv_lora_rank + rope dims per
token) and, at every decode step, re-expands the WHOLE cache through `kv_b_proj` (`expand_kv`):
2.1 M multiply-adds per cached token and layer for DeepSeek-V2-Lite, so on a CPU a decode step
grows with the context (measured: 18 ms/token at 16 tokens of context, 95 ms at 512, 5-layer
DSv2-Lite-shaped model, 2 cores). The expansion is row-wise: the expanded keys and values of a
position depend on that position's latent alone. So the expansion of the part of the cache
already seen can be kept and only the new positions expanded.

`memoize_expand_kv(model)` wraps each DeepSeek-V2 attention's `expand_kv`. Each call checks
which leading positions of the latents it is given equal the ones it expanded before (an exact
compare, ~1/4000 of re-expanding them) and expands only the rest into a growing buffer: all
but the new positions while a sequence grows, a common prefix after a cache was cropped (the
next chat turn), nothing kept for a new sequence, a reordered cache or another batch size. Results
are those of `expand_kv` on the new rows, written into the buffer: the same values, by the same
module (a fresh Linear call per step on fewer rows; float summation order per row can differ
from one call on all rows only where the backend's GEMM blocking depends on the row count).

Memory: the expanded keys and values, (heads * (nope + rope + v)) floats per token and layer
(DSv2-Lite float32: 20 KiB), plus a copy of the latents (kv_lora_rank + rope floats). Every
buffer grows by doubling, so a step copies only its new positions. Meant for CPU runs; on a GPU the
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
        self.n = 0  # positions expanded: bufs[...][:, :n] are valid
        self.bufs = None  # (latents (B, cap, R), rope keys (B, cap, r), keys (B, cap, H, dk), values (B, cap, H, dv))

    def _kept(self, kv_nope: torch.Tensor, k_rot: torch.Tensor) -> int:
        """How many leading positions of the given latents were expanded before (0: start over).
        All n when they extend the old ones; a shorter equal prefix after the cache was cropped
        (a chat turn that rewrote its tail) keeps that prefix."""
        if self.bufs is None:
            return 0
        lat, rot = self.bufs[0], self.bufs[1]
        if kv_nope.shape[0] != lat.shape[0] or kv_nope.dtype != lat.dtype or kv_nope.device != lat.device:
            return 0
        m = min(self.n, kv_nope.shape[2])
        if torch.equal(kv_nope[:, 0, :m], lat[:, :m]) and torch.equal(k_rot[:, 0, :m], rot[:, :m]):
            return m
        return 0

    def __call__(self, kv_nope: torch.Tensor, k_rot: torch.Tensor):
        if kv_nope.shape[1] != 1 or k_rot.shape[1] != 1:  # not the single-head latent layout it knows
            return self.expand(kv_nope, k_rot)
        S = kv_nope.shape[2]
        n = self._kept(kv_nope, k_rot)
        if n == 0:
            self.reset()
        self.n = n
        if S > n:
            k_new, v_new = self.expand(kv_nope[:, :, n:], k_rot[:, :, n:])  # (B, H, S - n, d)
            new = (kv_nope[:, 0, n:], k_rot[:, 0, n:], k_new.transpose(1, 2), v_new.transpose(1, 2))
            if self.bufs is None or self.bufs[0].shape[1] < S:  # grow (x2): amortised O(1) per position
                cap = max(S, 2 * (self.bufs[0].shape[1] if self.bufs is not None else 0), 64)
                bufs = tuple(t.new_empty(t.shape[0], cap, *t.shape[2:]) for t in new)
                if n:
                    for b, old in zip(bufs, self.bufs):
                        b[:, :n] = old[:, :n]
                self.bufs = bufs
            for b, t in zip(self.bufs, new):
                b[:, n:S] = t
            self.n = S
        # views (B, H, S, d), like expand_kv's own (non-contiguous) value states
        return self.bufs[2][:, :S].transpose(1, 2), self.bufs[3][:, :S].transpose(1, 2)


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


def unmemoize_expand_kv(model: nn.Module) -> int:
    """Undo memoize_expand_kv (transformers' own expand_kv again, e.g. to compare); returns how many."""
    n = 0
    for mod in model.modules():
        if isinstance(mod.__dict__.get("expand_kv"), _ExpandKVMemo):
            del mod.expand_kv
            n += 1
    return n
