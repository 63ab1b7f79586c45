"""A transformers attention backend for CPU decode: SDPA, except for a one-token query.

torch's CPU `scaled_dot_product_attention` is slow for a single query against a long cache
(measured, one thread, DeepSeek-V2-Lite head shapes, 512 cached tokens: 1.3-1.7 ms per layer vs
0.38 ms for matmul -> softmax -> matmul), which is every decode step. transformers' "eager" path
would be as fast there but materialises the (heads, S, S) scores at prefill. This backend,
registered in transformers' AttentionInterface as NAME with the SDPA mask builder, computes a
one-token query on the CPU in one native call (`hybrimoe.cpu.attend_one`: scores, softmax and the
weighted values per head on the kernel pool, K/V read where they lie; grouped-query heads without
repeating K/V; boolean or additive masks), or, for other dtypes or without the extension, as two
matmuls and a softmax; everything else goes to transformers' own SDPA function. The native call
matters most for DeepSeek-V2's kept MLA expansion (hybrimoe.mla): its keys are a strided view of
a (B, S, heads, d) buffer that matmul copies whole at every step (S x 16 x 192 floats a layer).

`use_cpu_decode_attention(model)` switches a loaded model to it; the default on a CPU device
(hybrimoe.models.load_gguf_model).
"""

from __future__ import annotations

import torch

from . import cpu as _cpu

NAME = "hybrimoe_cpu_decode"
_REGISTERED = False


def cpu_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """query (B, H, q, D), key (B, Hkv, S, D), value (B, Hkv, S, Dv) -> ((B, q, H, Dv), None), as
    transformers' sdpa_attention_forward returns; the fast path only for q == 1 on the CPU with no
    dropout, position bias, sinks or soft-capping (anything else: that SDPA function)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.shape[2] != 1 or query.device.type != "cpu" or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("s_aux") is not None or kwargs.get("softcap") or query.shape[1] % key.shape[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    B, H, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    rep = H // Hkv
    scale = D ** -0.5 if scaling is None else scaling
    if _native_ok(query, key, value):
        mask = None
        if attention_mask is not None:
            m = attention_mask[..., -1:, :S]  # (B, 1 | H, 1, S): the query's row
            mask = (torch.zeros(m.shape, dtype=torch.float32).masked_fill_(~m, float("-inf"))
                    if m.dtype == torch.bool else m.to(torch.float32))
            if mask.shape[0] != B:
                mask = mask.expand(B, *mask.shape[1:])
        out = _cpu.attend_one(query, key, value, scale, mask)  # (B, H, 1, Dv), K/V read in place
        return out.reshape(B, 1, H, value.shape[-1]), None
    scores = torch.matmul(query.reshape(B, Hkv, rep, D), key.transpose(-1, -2)).float() * scale  # (B, Hkv, rep, S)
    if attention_mask is not None:
        m = attention_mask[..., -1:, :S]  # (B, 1 | H, 1, S): the query's row
        m = m.reshape(B, Hkv, rep, S) if m.shape[1] == H and H > 1 else m
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, rep, Dv)
    return out.reshape(B, 1, H, value.shape[-1]), None


def _native_ok(query, key, value) -> bool:
    """The native one-token kernel (hybrimoe.cpu.attend_one) takes float32 CPU tensors whose last
    dimension is contiguous; it reads the (kept, strided) key/value cache where it lies, where
    torch's matmul would first copy it (S x heads x d floats a layer and step)."""
    if not _cpu.available():
        return False
    return all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in (query, key, value))


def use_cpu_decode_attention(model) -> None:
    """Switch a transformers model to this backend (it falls back to SDPA wherever it does not apply).
    transformers' attention modules are imported here, not at import of hybrimoe: they pull in
    torch's flex attention and Triton, which must not happen before a test process has chosen
    Triton's interpreter (TRITON_INTERPRET)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, cpu_decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _REGISTERED = True
    model.set_attn_implementation(NAME)
