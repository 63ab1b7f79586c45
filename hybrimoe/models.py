"""GGUF MoE file -> transformers model whose MoE blocks are ours; `patch(model)` for a model in hand.

    GGUF file ──GGUFModel──▶ hf_config_from_gguf ──▶ XxxForCausalLM built on the meta device
        │                                               │  every non-expert parameter: dequantized
        │                                               │  GGUF tensor (table _NAMES) -> dtype, device
        │                                               │  (dense="quant": quantized Linear/Embedding
        │                                               │  weights stay GGUF blocks, hybrimoe.qlinear)
        └──ExpertStore: routed experts stay quantized   │  each MoE block -> moe_factory(layer, block,
                         in host memory  ───────────────┘                      gguf_model, store)

The dense expert weights of the transformers model are never allocated: the model is built on
the meta device, non-expert parameters are replaced one by one by real tensors, and every MoE
block (whose `experts` still sit on meta) is swapped for the module the factory returns. The
block handed to the factory keeps its router (`block.gate.weight`, (E, H)) and shared experts
loaded, so a factory takes them from there. The default factory builds a `ReferenceMoEBlock`,
the oracle: `hybrimoe.reference.moe_forward` on dequantized experts.

Architectures (transformers 5.17 classes; `.mlp` is the MoE block of a decoder layer):

    GGUF arch      transformers model_type  config / model class                       MoE block
    deepseek2      deepseek_v2              DeepseekV2Config / DeepseekV2ForCausalLM    DeepseekV2Moe
    qwen2moe       qwen2_moe                Qwen2MoeConfig / Qwen2MoeForCausalLM        Qwen2MoeSparseMoeBlock
    qwen3moe       qwen3_moe                Qwen3MoeConfig / Qwen3MoeForCausalLM        Qwen3MoeSparseMoeBlock
    llama+experts  mixtral                  MixtralConfig / MixtralForCausalLM          MixtralSparseMoeBlock
    olmoe          olmoe                    OlmoeConfig / OlmoeForCausalLM              OlmoeSparseMoeBlock

In 5.17 every one of these blocks maps (B, S, H) -> a (B, S, H) tensor (no router-logits tuple:
router logits are recorded by forward hooks on the router class, which our blocks do not call,
so `output_router_logits=True` records nothing). Their experts are fused 3-D parameters:
`experts.gate_up_proj` (E, 2I, H) = [gate; up] along dim 1, `experts.down_proj` (E, H, I).

RoPE convention. llama.cpp's converter permutes the rows of attn_q / attn_k of arch 'llama'
models (Mixtral) so its interleaved ("NORM") rope equals transformers' rotate-half rope; like
transformers' own GGUF loader we treat every 'llama' GGUF as so permuted and undo it on load
(`_reverse_permute`). Our synthetic files hold random matrices, for which that only means the
same weights in another row order: still one consistent model. deepseek2 (interleaved rope on
both sides), qwen2moe, qwen3moe and olmoe (NEOX rope on both sides) are stored unpermuted.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import formats
from .errors import ModelConfigError, QuantShapeError
from .gguf_model import GGUFModel, MoEConfig
from .cpu_attention import use_cpu_decode_attention
from .cpu_step import use_native_rms_norm
from .layout import ExpertLayout
from .mla import memoize_expand_kv, use_mla_decode
from .qlinear import QuantEmbedding, QuantLinear
from .reference import RoutingConfig, moe_forward
from .store import ExpertStore
from .transfer import host_zeros

# --------------------------------------------------------------------------- arch tables ------
# GGUF arch -> (transformers model_type, config class name, causal-LM class name)
ARCH_CLASSES: dict[str, tuple[str, str, str]] = {
    "deepseek2": ("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "llama": ("mixtral", "MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeForCausalLM"),
}
_MODEL_TYPE_TO_ARCH = {v[0]: k for k, v in ARCH_CLASSES.items()}

# transformers parameter name -> GGUF tensor name, per arch. "{i}" is the block index; names are
# relative to the causal-LM model. Only parameters the built model has are looked up, so optional
# variants (deepseek2's q_proj vs q_a_proj/q_b_proj, qwen2moe's biases) coexist in one table.
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GQA = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
}
_QKV_BIAS = {
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
_QK_NORM = {
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_MLA = {  # deepseek2 multi-head latent attention
    "self_attn.q_proj.weight": "attn_q.weight",  # q_lora_rank None
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",  # (kv_lora + rope, H): latent first
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    # GGUF ne (kv_lora, n_heads*(nope+v)) = numpy (n_heads*(nope+v), kv_lora), per head [nope | v]
    # rows; newer llama.cpp files split it into attn_k_b + attn_v_b instead (_kv_b_from_split).
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
}
_DENSE_FFN = {
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_ROUTER = {"mlp.gate.weight": "ffn_gate_inp.weight"}  # (E, H)
_SHARED_DS = {
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_SHARED_QWEN2 = {
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",  # GGUF (H,) -> (1, H)
}
# Routed experts: never loaded into the model; they stay in the ExpertStore.
#   mlp.experts.gate_up_proj (E, 2I, H) <- [ffn_gate_exps; ffn_up_exps],  mlp.experts.down_proj <- ffn_down_exps
#   (or the per-expert ffn_{gate,up,down}.E of older files: GGUFModel.expert_tensors)

NAMES: dict[str, dict[str, str]] = {
    "deepseek2": {**_LAYER, **_MLA, **_DENSE_FFN, **_ROUTER, **_SHARED_DS},
    "qwen2moe": {**_LAYER, **_GQA, **_QKV_BIAS, **_DENSE_FFN, **_ROUTER, **_SHARED_QWEN2},
    "qwen3moe": {**_LAYER, **_GQA, **_QK_NORM, **_DENSE_FFN, **_ROUTER},
    "llama": {**_LAYER, **_GQA, **_DENSE_FFN, **_ROUTER},
    "olmoe": {**_LAYER, **_GQA, **_QK_NORM, **_DENSE_FFN, **_ROUTER},
}

_EXPERT_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.")
_ROUTER_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|shared_expert_gate)\.weight$")
_LAYER_PARAM = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _transformers_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelConfigError(f"transformers {transformers.__version__} has no class {name}; "
                               "hybrimoe is tested with transformers 5.17")
    return cls


# --------------------------------------------------------------------------- config ----------
def _rope_parameters(m: GGUFModel) -> dict:
    """transformers rope_parameters from GGUF rope keys (default rope, or YaRN / linear scaling)."""
    theta = float(m.config.rope_theta)
    kind = m.get(f"{m.arch}.rope.scaling.type", str, "none")
    if kind in ("none", ""):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(m.get(f"{m.arch}.rope.scaling.factor", float, 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind == "yarn":
        p = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
             "original_max_position_embeddings": int(m.get(f"{m.arch}.rope.scaling.original_context_length", int)),
             "beta_fast": float(m.get(f"{m.arch}.rope.scaling.yarn_beta_fast", float, 32.0)),
             "beta_slow": float(m.get(f"{m.arch}.rope.scaling.yarn_beta_slow", float, 1.0))}
        log_mul = m.get(f"{m.arch}.rope.scaling.yarn_log_multiplier", float, None)
        if log_mul:
            # llama.cpp's convert writes 0.1 * mscale_all_dim (DeepSeek-V2); it assumes mscale ==
            # mscale_all_dim, so transformers' yarn attention_factor is 1 as in llama.cpp.
            p["mscale_all_dim"] = p["mscale"] = float(log_mul) / 0.1
        return p
    raise ModelConfigError(f"{m.path}: {m.arch}.rope.scaling.type is {kind!r}; supported: none, linear, yarn")


def hf_config_from_gguf(model: GGUFModel):
    """transformers config (DeepseekV2Config, Qwen2MoeConfig, Qwen3MoeConfig, MixtralConfig or
    OlmoeConfig) equivalent to the GGUF's metadata. Raises ModelConfigError for an arch without a
    transformers class or metadata the class cannot express."""
    c: MoEConfig = model.config
    arch = c.arch
    if arch not in ARCH_CLASSES:
        raise ModelConfigError(f"{model.path}: architecture {arch!r} has no transformers model class here; "
                               f"supported: {', '.join(ARCH_CLASSES)}")
    cfg_cls = _transformers_class(ARCH_CLASSES[arch][1])
    emb = model.tensor_info("token_embd.weight")
    vocab = int(emb.shape[1])  # ne order (H, V)
    if c.vocab_size and c.vocab_size != vocab:
        raise ModelConfigError(f"{model.path}: vocab_size {c.vocab_size} (metadata) != token_embd.weight rows {vocab}")
    head_dim = model.get(f"{arch}.attention.key_length", int, 0) or c.hidden // c.n_heads
    value_dim = model.get(f"{arch}.attention.value_length", int, 0) or head_dim
    common = dict(
        vocab_size=vocab, hidden_size=c.hidden, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.context_length or 4096, rms_norm_eps=c.rms_eps,
        rope_parameters=_rope_parameters(model),
        bos_token_id=model.get("tokenizer.ggml.bos_token_id", int, None),
        eos_token_id=model.get("tokenizer.ggml.eos_token_id", int, None),
        pad_token_id=model.get("tokenizer.ggml.padding_token_id", int, None),
        tie_word_embeddings=not model.has("output.weight"),
    )
    if arch != "deepseek2" and head_dim != value_dim:
        raise ModelConfigError(f"{model.path}: key_length {head_dim} != value_length {value_dim}: "
                               f"transformers' {cfg_cls.__name__} has one head_dim")
    if arch == "deepseek2":
        if c.gating != "softmax":
            raise ModelConfigError(f"{model.path}: deepseek2 with {c.gating} gating (DeepSeek-V3 style) is not "
                                   "expressible as DeepseekV2Config (softmax routing only)")
        rope = model.get("deepseek2.rope.dimension_count", int)
        # Newer llama.cpp files describe MLA heads in *_mla keys (key_length then is kv_lora + rope).
        qk_head = model.get("deepseek2.attention.key_length_mla", int, 0) or head_dim
        v_head = model.get("deepseek2.attention.value_length_mla", int, 0) or value_dim
        n_shared = 0
        if c.n_shared:
            if c.shared_ffn % c.expert_ffn:
                raise ModelConfigError(f"{model.path}: shared expert width {c.shared_ffn} is not a multiple of "
                                       f"expert width {c.expert_ffn} (DeepseekV2Config sizes it n_shared * I)")
            n_shared = c.shared_ffn // c.expert_ffn
        q_lora = model.get("deepseek2.attention.q_lora_rank", int, 0)
        common["num_key_value_heads"] = c.n_heads  # MLA: kv_b expands the latent to every head
        return cfg_cls(
            **common, intermediate_size=c.dense_ffn or c.expert_ffn,
            q_lora_rank=q_lora or None, kv_lora_rank=model.get("deepseek2.attention.kv_lora_rank", int),
            qk_nope_head_dim=qk_head - rope, qk_rope_head_dim=rope, v_head_dim=v_head,
            n_routed_experts=c.n_experts, num_experts_per_tok=c.top_k, n_shared_experts=n_shared,
            moe_intermediate_size=c.expert_ffn, first_k_dense_replace=c.leading_dense,
            norm_topk_prob=c.norm_topk, routed_scaling_factor=c.routed_scale,
            topk_method="greedy", n_group=1, topk_group=1,
        )
    if c.leading_dense:
        raise ModelConfigError(f"{model.path}: {arch} with leading dense blocks is not supported")
    if arch == "qwen2moe":
        if not c.n_shared:
            raise ModelConfigError(f"{model.path}: qwen2moe without a shared expert (ffn_*_shexp) is not supported")
        return cfg_cls(
            **common, head_dim=head_dim, intermediate_size=c.dense_ffn or c.expert_ffn,
            moe_intermediate_size=c.expert_ffn, shared_expert_intermediate_size=c.shared_ffn,
            num_experts=c.n_experts, num_experts_per_tok=c.top_k, norm_topk_prob=c.norm_topk,
            qkv_bias=model.has("blk.0.attn_q.bias"), decoder_sparse_step=1, mlp_only_layers=[],
            use_sliding_window=False,
        )
    if c.n_shared:
        raise ModelConfigError(f"{model.path}: {arch} with shared experts is not supported")
    if arch == "qwen3moe":
        return cfg_cls(
            **common, head_dim=head_dim, intermediate_size=c.dense_ffn or c.expert_ffn,
            moe_intermediate_size=c.expert_ffn, num_experts=c.n_experts, num_experts_per_tok=c.top_k,
            norm_topk_prob=c.norm_topk, decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False,
        )
    if arch == "llama":
        return cfg_cls(
            **common, head_dim=head_dim, intermediate_size=c.expert_ffn, num_local_experts=c.n_experts,
            num_experts_per_tok=c.top_k, sliding_window=None,
        )
    # olmoe: its q_norm/k_norm are sized from hidden // heads, so head_dim cannot differ.
    if head_dim != c.hidden // c.n_heads:
        raise ModelConfigError(f"{model.path}: olmoe key_length {head_dim} != hidden/heads {c.hidden // c.n_heads}")
    return cfg_cls(**common, intermediate_size=c.expert_ffn, num_experts=c.n_experts,
                   num_experts_per_tok=c.top_k, norm_topk_prob=c.norm_topk, clip_qkv=None)


# --------------------------------------------------------------------------- tensors ---------
def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.LlamaModel.permute): GGUF rows of
    each head are rope pairs interleaved (x0 y0 x1 y1 ...), transformers wants halves (x.. y..)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of _reverse_permute); for tests."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _kv_b_from_split(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """kv_b_proj (n_heads*(nope+v), kv_lora) from llama.cpp's split MLA tensors:
    attn_k_b (n_heads, kv_lora, nope) (transposed per head) and attn_v_b (n_heads, v, kv_lora)."""
    if k_b.ndim != 3 or v_b.ndim != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise ModelConfigError(f"attn_k_b {k_b.shape} / attn_v_b {v_b.shape} are not (heads, kv_lora, nope) / "
                               "(heads, v, kv_lora)")
    kv = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
    return kv.reshape(-1, kv.shape[-1])


def _gguf_source(arch: str, hf_name: str) -> str | None:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _LAYER_PARAM.match(hf_name)
    if m and m.group(2) in NAMES[arch]:
        return f"blk.{m.group(1)}.{NAMES[arch][m.group(2)]}"
    return None


def _permuted_heads(gm: GGUFModel, src: str) -> int | None:
    """Heads whose rows llama.cpp permuted in tensor `src` (arch 'llama' attn_q / attn_k), else None.
    Whole rows move, so the same reversal applies to float rows and to raw block rows."""
    if gm.arch == "llama" and (src.endswith(".attn_q.weight") or src.endswith(".attn_k.weight")):
        return gm.config.n_heads if ".attn_q." in src else gm.config.n_kv_heads
    return None


def _consume(gm: GGUFModel, src: str, consumed: set) -> None:
    """Mark `src` used; for attn_kv_b also its split attn_k_b / attn_v_b copies, which some
    llama.cpp versions write beside it (the same weights)."""
    consumed.add(src)
    if src.endswith("attn_kv_b.weight"):
        consumed.update(n for n in (src.replace("kv_b", "k_b"), src.replace("kv_b", "v_b")) if gm.has(n))


def _load_tensor(gm: GGUFModel, hf_name: str, shape: torch.Size, consumed: set) -> np.ndarray:
    arch = gm.arch
    src = _gguf_source(arch, hf_name)
    if src is None:
        raise ModelConfigError(f"{gm.path}: no GGUF tensor is mapped to transformers parameter {hf_name!r} "
                               f"(arch {arch}); the model would keep it uninitialised")
    if src.endswith("attn_kv_b.weight") and not gm.has(src) and gm.has(src.replace("kv_b", "k_b")):
        kb, vb = src.replace("kv_b", "k_b"), src.replace("kv_b", "v_b")
        w = _kv_b_from_split(gm.dequant(kb), gm.dequant(vb))
        consumed.update((kb, vb))
    else:
        if not gm.has(src):
            raise ModelConfigError(f"{gm.path}: tensor {src!r} (for transformers parameter {hf_name!r}) is missing")
        w = gm.dequant(src)
        _consume(gm, src, consumed)
        heads = _permuted_heads(gm, src)
        if heads is not None:
            w = _reverse_permute(w, heads)
        if src.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(1, -1)
    if tuple(w.shape) != tuple(shape):
        raise ModelConfigError(f"{gm.path}: tensor {src!r} has shape {tuple(w.shape)} (numpy order), "
                               f"transformers parameter {hf_name!r} expects {tuple(shape)}")
    return w


def _swap_quant(model: nn.Module, mod_name: str, qt: formats.QuantTensor, dtype: torch.dtype) -> None:
    """Replace the nn.Linear / nn.Embedding `mod_name` by its QuantLinear / QuantEmbedding twin
    (a bias already loaded is carried over; one still on meta is loaded into the new module later)."""
    old = model.get_submodule(mod_name)
    if isinstance(old, nn.Embedding):
        new = QuantEmbedding(qt, dtype)
    else:
        new = QuantLinear(qt)
        if old.bias is not None:
            new._parameters["bias"] = old.bias
    parent, _, attr = mod_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _materialise_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers built on meta (rotary inv_freq): rebuild their modules on device."""
    for name, mod in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in mod._buffers.values()):
            if not type(mod).__name__.endswith("RotaryEmbedding"):
                bad = [k for k, b in mod._buffers.items() if b is not None and b.is_meta]
                raise ModelConfigError(f"buffer(s) {bad} of module {name!r} ({type(mod).__name__}) were not "
                                       "materialised: unknown module kind")
            with torch.device(device):
                new = type(mod)(config=mod.config)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)


def _check_materialised(model: nn.Module) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ModelConfigError(f"{len(left)} model parameter(s)/buffer(s) left unloaded on the meta device: "
                               f"{', '.join(left[:8])}{' ...' if len(left) > 8 else ''}")


# --------------------------------------------------------------------------- MoE blocks ------
def _is_moe_block(block: nn.Module) -> bool:
    ex = getattr(block, "experts", None)
    return (ex is not None and isinstance(getattr(ex, "gate_up_proj", None), torch.Tensor)
            and isinstance(getattr(ex, "down_proj", None), torch.Tensor)
            and isinstance(getattr(getattr(block, "gate", None), "weight", None), torch.Tensor))


class ReferenceMoEBlock(nn.Module):
    """Drop-in replacement of a transformers MoE block computed by `hybrimoe.reference`: the oracle.

    forward(x: (B, S, H) any float dtype) -> (B, S, H) same dtype and device, like the 5.17 blocks.
    Keeps the replaced block's router (`gate`, weight (E, H)) and shared expert modules under their
    transformers names (so state_dict keys match the stock model's, minus `experts.*`), reads the
    routed experts from `store` dequantized to float32 (cached per layer on first use: memory is
    4 bytes/weight of every expert touched) and computes in float32 on the CPU.
    """

    def __init__(self, layer: int, block: nn.Module, store, routing: RoutingConfig):
        super().__init__()
        if not _is_moe_block(block):
            raise ModelConfigError(f"layer {layer}: {type(block).__name__} is not a transformers MoE block "
                                   "(expected .gate.weight and .experts.gate_up_proj/.down_proj)")
        self.layer = layer
        self.routing = routing
        self.store = store
        for name, child in block.named_children():
            if name != "experts":
                self.add_module(name, child)
        # Attribute names, not module references: assigning a module would register it twice.
        self._shared_name = next((n for n in ("shared_experts", "shared_expert") if hasattr(block, n)), None)
        self._has_shared_gate = hasattr(block, "shared_expert_gate")
        for n in (self._shared_name, "shared_expert_gate" if self._has_shared_gate else None):
            for sub in ([] if n is None else getattr(block, n).modules()):
                if isinstance(sub, nn.Linear) and sub.bias is not None:
                    raise ModelConfigError(f"layer {layer}: shared-expert linear layers with bias are not supported")
        self._experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _expert(self, e: int):
        w = self._experts.get(e)
        if w is None:
            w = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                      for a in self.store.dequant_expert(self.layer, e))
            self._experts[e] = w
        return w

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).to("cpu", torch.float32)
        cpu = lambda t: t.detach().to("cpu", torch.float32)  # noqa: E731
        shared = shared_gate = None
        if self._shared_name is not None:
            s = getattr(self, self._shared_name)
            shared = (cpu(s.gate_proj.weight), cpu(s.up_proj.weight), cpu(s.down_proj.weight))
        if self._has_shared_gate:
            shared_gate = cpu(self.shared_expert_gate.weight)
        y, *_ = moe_forward(x, cpu(self.gate.weight), self._expert, self.routing, shared, shared_gate)
        return y.to(hidden_states.device, hidden_states.dtype).reshape(shape)

    def extra_repr(self) -> str:
        r = self.routing
        return f"layer={self.layer}, top_k={r.top_k}, gating={r.gating}, norm_topk={r.norm_topk}"


def reference_factory(layer: int, block: nn.Module, gguf_model, store) -> nn.Module:
    """The default moe_factory: a ReferenceMoEBlock routed as store.config says."""
    return ReferenceMoEBlock(layer, block, store, RoutingConfig.from_moe_config(store.config))


MoEFactory = Callable[[int, nn.Module, "GGUFModel | None", object], nn.Module]


def _swap_blocks(model: nn.Module, layers, factory: MoEFactory, gguf_model, store) -> None:
    for i in layers:
        dec = model.model.layers[i]
        block = dec.mlp
        if not _is_moe_block(block):
            raise ModelConfigError(f"layer {i}: expected a MoE block at model.layers.{i}.mlp, found "
                                   f"{type(block).__name__}")
        new = factory(i, block, gguf_model, store)
        if not isinstance(new, nn.Module):
            raise TypeError(f"moe_factory returned {type(new).__name__} for layer {i}, expected an nn.Module")
        dec.mlp = new


# --------------------------------------------------------------------------- loading ---------
def _quant_source(gm: GGUFModel, model: nn.Module, hf_name: str, shape: torch.Size, consumed: set):
    """For dense="quant": (module name, QuantTensor) when `hf_name` is the weight of an nn.Linear /
    nn.Embedding whose GGUF tensor is in a type the CPU kernels run (Q4_K, Q6_K, Q5_0, Q8_0) and
    needs at most a row permutation; else None (the parameter is dequantized as usual). Routers
    and qwen2moe's shared-expert gate stay float (the MoE blocks read them as tensors)."""
    mod_name, _, attr = hf_name.rpartition(".")
    if attr != "weight" or mod_name.endswith(".mlp.gate") or mod_name.endswith("shared_expert_gate"):
        return None
    if not isinstance(model.get_submodule(mod_name), (nn.Linear, nn.Embedding)):
        return None
    src = _gguf_source(gm.arch, hf_name)
    if src is None or not gm.has(src):
        return None  # e.g. kv_b split into k_b / v_b: rebuilt in float by _load_tensor
    info = gm.tensor_info(src)
    qtype = int(info.tensor_type)
    if qtype not in formats.EXPERT_QTYPES:
        return None
    raw = gm.raw(src)
    rows, cols = int(info.shape[1]), int(info.shape[0])  # GGUF ne order (cols, rows)
    if (rows, cols) != tuple(shape):
        raise ModelConfigError(f"{gm.path}: tensor {src!r} has shape {(rows, cols)} (numpy order), "
                               f"transformers parameter {hf_name!r} expects {tuple(shape)}")
    heads = _permuted_heads(gm, src)
    if heads is not None:
        raw = np.ascontiguousarray(_reverse_permute(raw, heads))
    _consume(gm, src, consumed)
    return mod_name, formats.QuantTensor(raw, qtype, (rows, cols))


def load_gguf_model(path, device="cpu", dtype=torch.float32, moe_factory: MoEFactory | None = None,
                    progress: bool = True, store: ExpertStore | None = None, dense: str = "dequant"):
    """Build the transformers causal LM of a GGUF MoE file. Returns (model, GGUFModel, ExpertStore).

    path: a .gguf file or an open GGUFModel. Non-expert tensors are dequantized to `dtype` on
    `device`; routed experts stay quantized in the ExpertStore; each MoE block is replaced by
    `moe_factory(layer_idx, block, gguf_model, store)` (default: ReferenceMoEBlock). Raises
    ModelConfigError naming any GGUF tensor left unused or model parameter left unloaded.
    store: an ExpertStore of this same file to reuse (e.g. already packed into a pinned arena);
    by default a new one (zero-copy views into the file map). The model is returned in eval mode
    with requires_grad=False parameters.
    dense: "dequant" (default) loads every non-expert matrix as a `dtype` tensor on `device`;
    "quant" (CPU only) keeps the Linear / Embedding weights stored in Q4_K / Q6_K / Q5_0 / Q8_0 as
    their raw GGUF blocks (hybrimoe.qlinear: QuantLinear on the CPU kernels, a fifth to a seventh of
    the float32 bytes); "auto" = "quant" on a CPU device when the CPU kernels are built, else "dequant".
    """
    if dense not in ("dequant", "quant", "auto"):
        raise ModelConfigError(f"dense={dense!r}: expected 'dequant', 'quant' or 'auto'")
    from . import cpu as _cpu

    if dense == "auto":
        dense = "quant" if torch.device(device).type == "cpu" and _cpu.available() else "dequant"
    if dense == "quant":
        if torch.device(device).type != "cpu":
            raise ModelConfigError(f"dense='quant' runs the dense layers on the CPU kernels: device must be "
                                   f"'cpu', found {device!r}")
        if not _cpu.available():
            raise ModelConfigError("dense='quant' needs the CPU kernel extension hybrimoe._cpu, which is not built")
    gm = path if isinstance(path, GGUFModel) else GGUFModel(path)
    config = hf_config_from_gguf(gm)
    model_cls = _transformers_class(ARCH_CLASSES[gm.arch][2])
    if store is None:
        store = ExpertStore(gm)
    elif tuple(store.layers) != gm.config.moe_layers or store.config.n_experts != gm.config.n_experts:
        raise ModelConfigError(f"{gm.path}: the given store has MoE layers {list(store.layers)} and "
                               f"{store.config.n_experts} experts, the file {list(gm.config.moe_layers)} and "
                               f"{gm.config.n_experts}: a store of another model?")
    with torch.device("meta"):
        model = model_cls(config)
    moe_layers = set(gm.config.moe_layers)

    todo = []
    for name, p in model.named_parameters(remove_duplicate=True):
        m = _EXPERT_PARAM.match(name)
        if m and int(m.group(1)) in moe_layers:
            continue  # routed experts: in the store
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        todo.append((name, p.shape))
    consumed: set[str] = set()
    it = todo
    if progress:
        from tqdm import tqdm

        it = tqdm(todo, desc=f"loading {os.path.basename(gm.path)}", unit="tensor")
    for name, shape in it:
        q = _quant_source(gm, model, name, shape, consumed) if dense == "quant" else None
        if q is not None:
            _swap_quant(model, *q, dtype)
            continue
        w = _load_tensor(gm, name, shape, consumed)
        # routers stay float32 (the GGUF keeps them F32): a bf16 router can pick another expert
        # where two scores nearly tie; the MoE blocks that replace these read them as tensors
        m = _ROUTER_PARAM.match(name)
        keep = torch.float32 if m and int(m.group(1)) in moe_layers else dtype
        _set_param(model, name, torch.from_numpy(w).to(device=device, dtype=keep))
    if config.tie_word_embeddings:
        emb = model.model.embed_tokens
        if isinstance(emb, QuantEmbedding):
            model.lm_head = QuantLinear(emb.qt)
        else:
            model.lm_head.weight = emb.weight
    for layer in moe_layers:
        for which in ("gate", "up", "down"):
            consumed.update(gm.expert_tensors(layer, which)[0])
    unused = sorted(set(gm.tensors) - consumed)
    if unused:
        raise ModelConfigError(f"{gm.path}: {len(unused)} GGUF tensor(s) not used by the {type(model).__name__} "
                               f"mapping: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} "
                               "(unsupported variant of this architecture?)")
    _materialise_buffers(model, device)
    _swap_blocks(model, sorted(moe_layers), moe_factory or reference_factory, gm, store)
    _check_materialised(model)
    if torch.device(device).type == "cpu":
        _cpu_speedups(model)
    model.eval()
    return model, gm, store


# --------------------------------------------------------------------------- patch -----------
class ArrayExpertStore(ExpertStore):
    """In-memory expert store with ExpertStore's interface, for patch(): quantized blocks in numpy
    (ExpertStore's accessors, built from float weights instead of a GGUF file).

    layers: MoE layer indices; layout(layer): ExpertLayout; expert(layer, e): ExpertWeights
    (zero-copy views); span(layer, e): uint8 (layout.nbytes,) [gate | up | down]; arena_tensor(layer):
    torch uint8 (E, nbytes) (pinned when CUDA is present); dequant_expert(layer, e): float32
    (gate (I, H), up (I, H), down (H, I)); config: MoEConfig (routing as the source model does it).
    The arena is built directly (pack() is a no-op), one span per expert as in ExpertStore.
    """

    def __init__(self, config: MoEConfig, layers, weights, pin: bool | None = None):
        """weights: layer -> (gate (E, I, H), up (E, I, H), down (E, H, I)) float arrays."""
        self.config = config
        self.model = None
        self.layers = tuple(layers)
        self._layouts: dict[int, ExpertLayout] = {}
        self._arena: dict[int, np.ndarray] = {}
        self._arena_t: dict[int, torch.Tensor] = {}
        if pin is None:
            pin = torch.cuda.is_available()
        pin = bool(pin)
        self._pinned: dict[int, bool] = {}
        H, inter, E = config.hidden, config.expert_ffn, config.n_experts
        for layer in self.layers:
            parts = weights[layer]
            types = []
            for which, w, cols in zip(("gate", "up", "down"), parts, (H, H, inter)):
                name = f"blk.{layer}.ffn_{which}_exps.weight"
                t = formats.q4_k_m_type(name, n_layers=config.n_layers, layer=layer, cols=cols,
                                        n_expert=E, n_dims=3, arch=config.arch)
                if t not in formats.EXPERT_QTYPES:
                    raise QuantShapeError(f"{name}: Q4_K_M chooses {formats.qtype_name(t)} for rows of {cols} "
                                          f"weights (not a multiple of 32): no supported expert format")
                types.append(t)
            lay = ExpertLayout(H, inter, *types)
            buf = host_zeros((E, lay.nbytes), pin)
            self._pinned[layer] = pin
            arena = buf.numpy()
            for (off, nb, t), w in zip(((lay.gate_offset, lay.gate_bytes, types[0]),
                                        (lay.up_offset, lay.up_bytes, types[1]),
                                        (lay.down_offset, lay.down_bytes, types[2])), parts):
                w = np.asarray(w, dtype=np.float32)
                arena[:, off: off + nb] = formats.quantize(w.reshape(-1, w.shape[-1]), t).reshape(E, nb)
            self._layouts[layer] = lay
            self._arena[layer] = arena
            self._arena_t[layer] = buf

    def pack(self, layers=None, pin: bool | None = None) -> None:
        """No-op: the arena is built at construction."""

    @property
    def expert_bytes(self) -> int:
        return sum(lay.weight_bytes * self.config.n_experts for lay in self._layouts.values())


def moe_config_from_hf(config, layers) -> MoEConfig:
    """MoEConfig of a transformers MoE config, with routing as that class's router computes it."""
    mt = config.model_type
    arch = _MODEL_TYPE_TO_ARCH.get(mt)
    if arch is None:
        raise ModelConfigError(f"model_type {mt!r} is not supported by patch(); supported: "
                               f"{', '.join(_MODEL_TYPE_TO_ARCH)}")
    g = lambda k, d=None: getattr(config, k, d)  # noqa: E731
    E = g("num_experts") or g("n_routed_experts") or g("num_local_experts")
    expert_ffn = g("moe_intermediate_size") if arch in ("deepseek2", "qwen2moe", "qwen3moe") else g("intermediate_size")
    n_shared, shared_ffn, norm, scale = 0, 0, bool(g("norm_topk_prob", False)), 1.0
    if arch == "deepseek2":
        if g("topk_method", "greedy") != "greedy":
            raise ModelConfigError(f"deepseek_v2 topk_method {g('topk_method')!r} is not supported (greedy only)")
        n_shared, shared_ffn = g("n_shared_experts") or 0, (g("n_shared_experts") or 0) * expert_ffn
        norm, scale = False, float(g("routed_scaling_factor", 1.0))  # the 5.17 router never renormalises
    elif arch == "qwen2moe":
        n_shared, shared_ffn = 1, g("shared_expert_intermediate_size")
    elif arch == "llama":
        norm = True  # MixtralTopKRouter always renormalises
    return MoEConfig(
        arch=arch, n_layers=config.num_hidden_layers, hidden=config.hidden_size, n_experts=E,
        top_k=config.num_experts_per_tok, expert_ffn=expert_ffn, n_shared=n_shared, shared_ffn=shared_ffn,
        shared_gate=arch == "qwen2moe", gating="softmax", norm_topk=norm, routed_scale=scale,
        leading_dense=min(layers) if layers else 0, dense_ffn=g("intermediate_size", 0),
        vocab_size=config.vocab_size, n_heads=config.num_attention_heads,
        n_kv_heads=g("num_key_value_heads") or config.num_attention_heads,
        rms_eps=float(g("rms_norm_eps", 1e-6)),
    )


def patch(model: nn.Module, quantize: str | None = "q4_k", gguf=None, moe_factory: MoEFactory | None = None):
    """Swap the MoE blocks of a transformers MoE model in place. Returns (model, store).

    quantize="q4_k": the experts are quantized with llama.cpp's Q4_K_M type choice (Q4_K gate/up,
    Q4_K or Q6_K down by layer; Q5_0 / Q8_0 fallbacks when rows are not multiples of 256) into an
    ArrayExpertStore, and the experts' float parameters are dropped. gguf (a path or GGUFModel of
    the same model): take its quantized experts instead (quantize is then ignored). Each block
    becomes moe_factory(layer_idx, block, gguf_model_or_None, store) (default ReferenceMoEBlock).
    """
    layers = [i for i, dec in enumerate(model.model.layers) if _is_moe_block(dec.mlp)]
    if not layers:
        raise ModelConfigError(f"{type(model).__name__}: no transformers MoE block found at model.layers.*.mlp")
    gm = None
    if gguf is not None:
        gm = gguf if isinstance(gguf, GGUFModel) else GGUFModel(gguf)
        store = ExpertStore(gm)
        want = moe_config_from_hf(model.config, layers)
        got = gm.config
        for k in ("hidden", "n_experts", "top_k", "expert_ffn"):
            if getattr(want, k) != getattr(got, k):
                raise ModelConfigError(f"{gm.path}: {k} is {getattr(got, k)}, the model has {getattr(want, k)}")
        if tuple(layers) != tuple(store.layers):
            raise ModelConfigError(f"{gm.path}: MoE layers {list(store.layers)} != the model's {layers}")
    else:
        if quantize not in ("q4_k", "q4_k_m"):
            raise ValueError(f"quantize={quantize!r}: expected 'q4_k' (Q4_K_M type choice), or pass gguf=")
        weights = {}
        for i in layers:
            ex = model.model.layers[i].mlp.experts
            if getattr(ex, "is_transposed", False) or getattr(ex, "has_bias", False):
                raise ModelConfigError(f"layer {i}: transposed or biased expert weights are not supported")
            gu = ex.gate_up_proj.detach().float().cpu().numpy()
            inter = gu.shape[1] // 2
            weights[i] = (gu[:, :inter], gu[:, inter:], ex.down_proj.detach().float().cpu().numpy())
        store = ArrayExpertStore(moe_config_from_hf(model.config, layers), layers, weights)
    _swap_blocks(model, layers, moe_factory or reference_factory, gm, store)
    _cpu_speedups(model)
    return model, store


def _cpu_speedups(model: nn.Module) -> None:
    """On a CPU model: keep DeepSeek-V2's latent-cache expansion (hybrimoe.mla), run one-token
    attention in one native call (hybrimoe.cpu_attention), RMSNorm natively (hybrimoe.cpu_step) and
    DeepSeek-V2's one-token attention step with fewer ops (hybrimoe.mla.use_mla_decode).
    Float32 throughout, within float32 rounding of transformers' ops; all skipped for a GPU model."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu":
        return
    memoize_expand_kv(model)
    use_cpu_decode_attention(model)
    use_native_rms_norm(model)
    use_mla_decode(model)
