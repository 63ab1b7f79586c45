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

from . import cpu as _cpu


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
        if _same(kv_nope[:, 0, :m], lat[:, :m]) and _same(k_rot[:, 0, :m], rot[:, :m]):
            return m
        return 0

    def _expand_one(self, kv_nope: torch.Tensor, k_rot: torch.Tensor, n: int) -> bool:
        """Position n alone into the buffers, with DeepseekV2Attention.expand_kv's own arithmetic (the
        same kv_b_proj call on the same row, the rope key copied to every head) in three copies
        instead of its dozen ops. False where the module is not that class (the generic path runs)."""
        mod = getattr(self.expand, "__self__", None)
        if type(mod).__name__ not in _EXPAND_ONE_CLASSES:
            return False
        dn, dv = mod.qk_nope_head_dim, mod.v_head_dim
        lat, rot, keys, vals = self.bufs
        kv = mod.kv_b_proj(kv_nope[:, :, n])  # (B, 1, H * (dn + dv))
        kv = kv.view(kv.shape[0], -1, dn + dv)  # (B, H, dn + dv)
        keys[:, n, :, :dn] = kv[..., :dn]
        keys[:, n, :, dn:] = k_rot[:, :, n]  # (B, 1, r): the shared rope key, every head
        vals[:, n] = kv[..., dn:]
        lat[:, n] = kv_nope[:, 0, n]
        rot[:, n] = k_rot[:, 0, n]
        return True

    def __call__(self, kv_nope: torch.Tensor, k_rot: torch.Tensor):
        if kv_nope.shape[1] != 1 or k_rot.shape[1] != 1:  # not the single-head latent layout it knows
            return self.expand(kv_nope, k_rot)
        S = kv_nope.shape[2]
        n = self._kept(kv_nope, k_rot)
        if n == 0:
            self.reset()
        self.n = n
        if S == n + 1 and self.bufs is not None and self.bufs[0].shape[1] > n and self._expand_one(kv_nope, k_rot, n):
            self.n = S
        elif S > n:
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


# expand_kv implementations whose arithmetic _ExpandKVMemo._expand_one repeats (read before adding one)
_EXPAND_ONE_CLASSES = frozenset({"DeepseekV2Attention"})


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b hold the same bytes (so their expansions are the same): one memcmp where both are
    contiguous CPU tensors of one dtype and the extension is built, else torch.equal (which also
    calls -0.0 and 0.0 equal: either way an equal answer means an equal expansion)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if (a.device.type == "cpu" and b.device.type == "cpu" and a.is_contiguous() and b.is_contiguous()
            and _cpu.available()):
        return bool(_cpu._ext().same_bytes(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()))
    return torch.equal(a, b)


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


# --------------------------------------------------------------- one-token decode forward ---

def _decode_forward(mod: nn.Module, own):
    """DeepseekV2Attention.forward for one token on the CPU in float32, with fewer ops: the same
    projections (q_proj, kv_a_proj_with_mqa, kv_b_proj via the memo, o_proj), then rope + latent
    RMSNorm in one native call, the transformers cache update, the kept expansion, and one native
    attention call reading the kept keys/values where they lie (hybrimoe.cpu.attend_one). Any other
    call (prefill, a mask, bf16, a GPU, q_lora, no cache) runs the module's own forward."""

    def forward(hidden_states, attention_mask=None, past_key_values=None, position_embeddings=None, **kwargs):
        memo = mod.__dict__.get("expand_kv")
        norm = mod.kv_a_layernorm
        if (hidden_states.shape[:2] != (1, 1) or attention_mask is not None or past_key_values is None
                or mod.q_lora_rank is not None or mod.training or hidden_states.dtype != torch.float32
                or hidden_states.device.type != "cpu" or not isinstance(memo, _ExpandKVMemo)
                or position_embeddings is None or not torch.is_complex(position_embeddings)
                or position_embeddings.numel() * 2 != mod.qk_rope_head_dim
                or norm.weight.dtype != torch.float32 or not _cpu.available()):
            return own(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                       position_embeddings=position_embeddings, **kwargs)
        H, dq, r, R = mod.num_heads, mod.qk_head_dim, mod.qk_rope_head_dim, mod.kv_lora_rank
        q = mod.q_proj(hidden_states).contiguous()  # (1, 1, H * dq)
        ckv = mod.kv_a_proj_with_mqa(hidden_states).contiguous()  # (1, 1, R + r)
        if q.dtype != torch.float32 or ckv.dtype != torch.float32:
            return own(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                       position_embeddings=position_embeddings, **kwargs)
        f = torch.view_as_real(position_embeddings.to(torch.complex64)).contiguous()  # (re, im) pairs
        _cpu._ext().mla_rope_norm(q.data_ptr(), H, dq, r, ckv.data_ptr(), R, norm.weight.contiguous().data_ptr(),
                                  float(norm.variance_epsilon), f.data_ptr())
        k_nope, k_pe = past_key_values.update(ckv[..., :R].view(1, 1, 1, R), ckv[..., R:].view(1, 1, 1, r),
                                              mod.layer_idx)
        keys, values = memo(k_nope, k_pe)
        out = _cpu.attend_one(q.view(1, 1, H, dq).transpose(1, 2), keys, values, mod.scaling)
        return mod.o_proj(out.reshape(1, 1, H * mod.v_head_dim)), None

    forward.hybrimoe_mla_decode = True
    return forward


def use_mla_decode(model: nn.Module) -> int:
    """Give every DeepSeek-V2 attention whose expand_kv is memoised (memoize_expand_kv) the one-token
    CPU decode forward above; returns how many. Idempotent."""
    n = 0
    for mod in model.modules():
        if type(mod).__name__ not in _EXPAND_ONE_CLASSES or not isinstance(mod.__dict__.get("expand_kv"),
                                                                            _ExpandKVMemo):
            continue
        if getattr(mod.forward, "hybrimoe_mla_decode", False):
            continue
        mod.forward = _decode_forward(mod, mod.forward)
        n += 1
    return n
