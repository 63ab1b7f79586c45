"""A transformers attention backend for CPU decode: SDPA, except for a one-token query.

torch's CPU `scaled_dot_product_attention` is slow for a single query against a long cache
(measured, one thread, DeepSeek-V2-Lite head shapes, 512 cached tokens: 1.3-1.7 ms per layer vs
0.38 ms for matmul -> softmax -> matmul), which is every decode step. transformers' "eager" path
would be as fast there but materialises the (heads, S, S) scores at prefill. This backend,
registered in transformers' AttentionInterface as NAME with the SDPA mask builder, computes a
one-token query on the CPU as two matmuls and a softmax (grouped-query heads without repeating
K/V; boolean or additive masks) and hands everything else to transformers' own SDPA function.

`use_cpu_decode_attention(model)` switches a loaded model to it; the default on a CPU device
(hybrimoe.models.load_gguf_model).
"""

from __future__ import annotations

import torch

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
    scores = torch.matmul(query.reshape(B, Hkv, rep, D), key.transpose(-1, -2)).float() * scale  # (B, Hkv, rep, S)
    if attention_mask is not None:
        m = attention_mask[..., -1:, :S]  # (B, 1 | H, 1, S): the query's row
        m = m.reshape(B, Hkv, rep, S) if m.shape[1] == H and H > 1 else m
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, rep, Dv)
    return out.reshape(B, 1, H, value.shape[-1]), None


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
