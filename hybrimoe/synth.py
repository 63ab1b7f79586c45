"""Synthetic GGUF MoE models: complete, valid files written with `gguf.GGUFWriter`.

A synthetic model has real metadata, random but well-scaled weights (linear layers ~ N(0, 1/fan_in),
norms 1), tensor types chosen by llama.cpp's Q4_K_M recipe (`formats.q4_k_m_type`, so the
dsv2-lite preset has Q5_0/Q8_0 down projections as the real file does), and a small byte-level
BPE tokenizer in the metadata. Files are written tensor by tensor (the whole model is never in
memory), and every file loads back through `GGUFModel` / `ExpertStore`: the real loading path is
the tested path.

Weights: `weights="quantize"` draws float32 weights and quantizes them with our quantizers (small
models, tests: the float weights are reproducible from the seed); `weights="blocks"` draws random
quantized blocks directly (valid codes and fp16 scales giving the same per-weight std), which is
what the real-shaped benchmark presets use: quantizing billions of floats in numpy takes too long.

Presets (`PRESETS`): tiny (the embedded default: seconds on a laptop CPU; its Q4_K_M types put
Q4_K gate/up and Q5_0/Q8_0 down projections in the experts and Q6_K in the dense layer and
output, so all four formats appear), dsv2-lite, mixtral, qwen3-30b-a3b, plus small test variants
of the other architectures (tiny-qwen2moe, tiny-qwen3moe, tiny-mixtral, tiny-olmoe).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

from . import formats
from .gguf_model import split_expert_name

F32 = int(T.F32)


@dataclass(frozen=True)
class SynthConfig:
    arch: str
    n_layers: int
    hidden: int
    n_experts: int
    top_k: int
    expert_ffn: int
    n_shared: int = 0
    shared_ffn: int = 0
    leading_dense: int = 0
    dense_ffn: int = 0
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 64
    # deepseek2 multi-head latent attention
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    norm_topk: bool | None = None
    gating: str = "softmax"
    routed_scale: float = 1.0
    context_length: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    router_std: float = 1.0  # multiplies the 1/sqrt(hidden) router init: larger = peakier routing
    weights: str = "quantize"  # or "blocks"
    # routed experts as one 2-D tensor per expert (blk.L.ffn_gate.E.weight ...), the layout of GGUF
    # files converted before llama.cpp merged them; the same weights as the merged layout
    split_experts: bool = False
    # deepseek2 attention as llama.cpp's converters write it since 2025 (convert_hf_to_gguf.py
    # DeepseekV2Model): attn_kv_b split per head into attn_k_b (heads, kv_lora, nope) and attn_v_b
    # (heads, v, kv_lora), head_count_kv 1, key/value_length = kv_lora + rope / kv_lora and the
    # head sizes in key_length_mla / value_length_mla. The two tensors hold exactly the values of
    # the attn_kv_b this config writes otherwise (dequantized, stored F32), so both layouts are one model.
    mla_split: bool = False
    seed: int = 0
    name: str = "synthetic"

    def with_layers(self, n_layers: int) -> "SynthConfig":
        if n_layers <= self.leading_dense:
            raise ValueError(f"n_layers={n_layers} leaves no MoE layer (leading_dense={self.leading_dense})")
        return replace(self, n_layers=n_layers)


PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(
        arch="deepseek2", n_layers=4, hidden=256, n_experts=8, top_k=2, expert_ffn=160,
        n_shared=1, shared_ffn=160, leading_dense=1, dense_ffn=512, n_heads=4, n_kv_heads=4,
        kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32, norm_topk=False,
        router_std=4.0, name="tiny",
    ),
    "dsv2-lite": SynthConfig(
        arch="deepseek2", n_layers=27, hidden=2048, n_experts=64, top_k=6, expert_ffn=1408,
        n_shared=2, shared_ffn=2816, leading_dense=1, dense_ffn=10944, n_heads=16, n_kv_heads=16,
        kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128, norm_topk=False,
        weights="blocks", name="dsv2-lite",
    ),
    "mixtral": SynthConfig(
        arch="llama", n_layers=32, hidden=4096, n_experts=8, top_k=2, expert_ffn=14336,
        n_heads=32, n_kv_heads=8, head_dim=128, rope_theta=1e6, rms_eps=1e-5, weights="blocks",
        name="mixtral",
    ),
    "qwen3-30b-a3b": SynthConfig(
        arch="qwen3moe", n_layers=48, hidden=2048, n_experts=128, top_k=8, expert_ffn=768,
        n_heads=32, n_kv_heads=4, head_dim=128, rope_theta=1e6, weights="blocks", name="qwen3-30b-a3b",
    ),
    # Small variants of every supported architecture (tests, tiny configs of issue 6).
    "tiny-qwen2moe": SynthConfig(
        arch="qwen2moe", n_layers=3, hidden=256, n_experts=8, top_k=2, expert_ffn=128, n_shared=1,
        shared_ffn=256, n_heads=4, n_kv_heads=2, head_dim=64, name="tiny-qwen2moe",
    ),
    "tiny-qwen3moe": SynthConfig(
        arch="qwen3moe", n_layers=3, hidden=256, n_experts=8, top_k=2, expert_ffn=128,
        n_heads=4, n_kv_heads=2, head_dim=64, name="tiny-qwen3moe",
    ),
    "tiny-mixtral": SynthConfig(
        arch="llama", n_layers=3, hidden=256, n_experts=8, top_k=2, expert_ffn=512,
        n_heads=4, n_kv_heads=2, head_dim=64, name="tiny-mixtral",
    ),
    "tiny-olmoe": SynthConfig(
        arch="olmoe", n_layers=3, hidden=256, n_experts=8, top_k=2, expert_ffn=128,
        n_heads=4, n_kv_heads=4, head_dim=64, name="tiny-olmoe",
    ),
}


# ---------------------------------------------------------------- tokenizer -----------------
_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a mixture of experts model routes every token "
    "to a few experts; the cache keeps the hot experts on the gpu while the cpu computes the rest. "
    "hello world! what is the capital of france? paris is the capital of france. once upon a time "
    "there was a small model that ran on one gpu and the host cpu together, and it was fast. "
)


def _byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (a well-known fact of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer(n_merges: int = 200) -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary learned greedily on a small embedded corpus.

    Returns (tokens, merges, token_types): specials <|bos|> <|endoftext|> first, then 256 byte
    tokens, then one token per merge. The end token is spelled <|endoftext|>: llama.cpp marks
    end-of-generation tokens by their text (llama-vocab.cpp), and an eos it does not recognise
    loads with a warning."""
    bu = _byte_unicode()
    words = []
    for w in _CORPUS.split(" "):
        if w:
            words.append([bu[b] for b in (" " + w).encode()])
    merges: list[str] = []
    vocab = ["<|bos|>", EOS_TOKEN] + [bu[b] for b in range(256)]
    for _ in range(n_merges):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), c = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if c < 2:
            break
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    types = [3, 3] + [1] * (len(vocab) - 2)  # 3 = control, 1 = normal
    return vocab, merges, types


EOS_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ---------------------------------------------------------------- weights -------------------
@dataclass
class _TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order, last dim = row length
    qtype: int
    make: Callable[[], np.ndarray]  # returns float32 (shape) for F32, or uint8 blocks
    make_float: Callable[[], np.ndarray]  # float32 weights before quantization (quantize mode)


def random_blocks(qtype: int, rows: int, cols: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks of `qtype` for a (rows, cols) matrix whose weights have about `std`.

    Quant codes are uniform; per-block fp16 scales vary by +-50% around the value that gives `std`.
    Returns uint8 (rows, row_bytes)."""
    nb = rows * cols // formats.block_elems(qtype)
    blk = np.zeros(nb, dtype=formats.BLOCK_DTYPES[qtype])
    jitter = rng.uniform(0.5, 1.5, nb).astype(np.float32)

    def f16(v):
        return np.asarray(v, dtype=np.float16).view(np.uint16)

    if qtype == formats.Q4_K:
        blk["scales"] = rng.integers(0, 256, (nb, 12), dtype=np.uint8)
        blk["qs"] = rng.integers(0, 256, (nb, 128), dtype=np.uint8)
        # w = d*sc*q - dmin*m, sc, m ~ U(0..63) (mean 31.5, rms ~36.4), q ~ U(0..15) (std 4.6);
        # dmin = 7.5 d centres the weights; std ~ d*sqrt(36.4^2*4.6^2 + 56.25*18.2^2) ~ d*210
        d = std / 210.0 * jitter
        blk["d"], blk["dmin"] = f16(d), f16(7.5 * d)
    elif qtype == formats.Q6_K:
        blk["ql"] = rng.integers(0, 256, (nb, 128), dtype=np.uint8)
        blk["qh"] = rng.integers(0, 256, (nb, 64), dtype=np.uint8)
        blk["scales"] = rng.integers(-127, 128, (nb, 16), dtype=np.int8)
        blk["d"] = f16(std / (18.5 * 73.3) * jitter)  # q-32 std 18.5, scale rms 73.3
    elif qtype == formats.Q5_0:
        blk["qh"] = rng.integers(0, 256, (nb, 4), dtype=np.uint8)
        blk["qs"] = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        blk["d"] = f16(std / 9.2 * jitter)  # q-16 std 9.2
    elif qtype == formats.Q8_0:
        blk["qs"] = rng.integers(-127, 128, (nb, 32), dtype=np.int8)
        blk["d"] = f16(std / 73.3 * jitter)
    else:
        raise ValueError(f"random_blocks: unsupported type {formats.qtype_name(qtype)}")
    return blk.view(np.uint8).reshape(rows, -1)


def _specs(cfg: SynthConfig) -> Iterator[_TensorSpec]:
    """Tensor specs in file order. Each `make` draws from its own seeded generator, so one tensor
    can be regenerated without the others (tests rebuild the float weights this way)."""
    H, V = cfg.hidden, len(build_tokenizer()[0])

    def qtype_for(name: str, shape: tuple[int, ...]) -> int:
        # One attn_v-like and one ffn_down* tensor per block in these archs, so llama.cpp's layer
        # counters equal the block index parsed from the name (layer=None).
        t = formats.q4_k_m_type(name, n_layers=cfg.n_layers, layer=None, cols=shape[-1],
                                n_expert=cfg.n_experts, n_dims=len(shape), arch=cfg.arch)
        # Types our writer cannot produce (Q5_K for Mixtral's attn_output, F16 fallbacks) are
        # stored as F32: they are non-expert tensors, loaded dequantized anyway.
        return t if t in formats.EXPERT_QTYPES else F32

    idx = [0]

    def spec(name: str, shape: tuple[int, ...], kind: str = "linear", qtype: int | None = None) -> _TensorSpec:
        cols = shape[-1]
        if qtype is None:
            qtype = F32 if kind != "linear" or len(shape) == 1 else qtype_for(name, shape)
        seed = (cfg.seed, idx[0])
        idx[0] += 1
        std = 1.0 / np.sqrt(cols)
        if kind == "router":
            std *= cfg.router_std

        def make_float() -> np.ndarray:
            """The float32 weights before quantization (quantize mode only)."""
            rng = np.random.default_rng(seed)
            if kind == "norm":
                return np.ones(shape, np.float32) + rng.normal(0, 0.02, shape).astype(np.float32)
            if kind == "bias":
                return rng.normal(0, 0.02, shape).astype(np.float32)
            if qtype != F32 and cfg.weights == "blocks":
                raise ValueError(f"{name}: weights='blocks' models have no float weights")
            return rng.normal(0, std, shape).astype(np.float32)

        def make() -> np.ndarray:
            if qtype == F32 or kind != "linear":
                return make_float()
            rows = int(np.prod(shape[:-1]))
            if cfg.weights == "blocks":
                rng = np.random.default_rng(seed)
                return random_blocks(qtype, rows, cols, std, rng).reshape(*shape[:-1], -1)
            return formats.quantize(make_float().reshape(rows, cols), qtype).reshape(*shape[:-1], -1)

        return _TensorSpec(name, shape, qtype, make, make_float)

    yield spec("token_embd.weight", (V, H))
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        yield spec(p + "attn_norm.weight", (H,), "norm")
        if cfg.arch == "deepseek2":
            qk = cfg.qk_nope_dim + cfg.qk_rope_dim
            yield spec(p + "attn_q.weight", (cfg.n_heads * qk, H))
            yield spec(p + "attn_kv_a_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_dim, H))
            yield spec(p + "attn_kv_a_norm.weight", (cfg.kv_lora_rank,), "norm")
            kv_b = spec(p + "attn_kv_b.weight", (cfg.n_heads * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank))
            if cfg.mla_split:
                yield from _split_kv_b(cfg, kv_b, i)
            else:
                yield kv_b
            yield spec(p + "attn_output.weight", (H, cfg.n_heads * cfg.v_head_dim))
        else:
            hd = cfg.head_dim
            yield spec(p + "attn_q.weight", (cfg.n_heads * hd, H))
            yield spec(p + "attn_k.weight", (cfg.n_kv_heads * hd, H))
            yield spec(p + "attn_v.weight", (cfg.n_kv_heads * hd, H))
            if cfg.arch == "qwen2moe":
                yield spec(p + "attn_q.bias", (cfg.n_heads * hd,), "bias")
                yield spec(p + "attn_k.bias", (cfg.n_kv_heads * hd,), "bias")
                yield spec(p + "attn_v.bias", (cfg.n_kv_heads * hd,), "bias")
            if cfg.arch == "qwen3moe":
                yield spec(p + "attn_q_norm.weight", (hd,), "norm")
                yield spec(p + "attn_k_norm.weight", (hd,), "norm")
            if cfg.arch == "olmoe":
                yield spec(p + "attn_q_norm.weight", (cfg.n_heads * hd,), "norm")
                yield spec(p + "attn_k_norm.weight", (cfg.n_kv_heads * hd,), "norm")
            yield spec(p + "attn_output.weight", (H, cfg.n_heads * hd))
        yield spec(p + "ffn_norm.weight", (H,), "norm")
        if i < cfg.leading_dense:
            yield spec(p + "ffn_gate.weight", (cfg.dense_ffn, H))
            yield spec(p + "ffn_up.weight", (cfg.dense_ffn, H))
            yield spec(p + "ffn_down.weight", (H, cfg.dense_ffn))
            continue
        E, inter = cfg.n_experts, cfg.expert_ffn
        yield spec(p + "ffn_gate_inp.weight", (E, H), "router", F32)
        for which, shape in (("gate", (E, inter, H)), ("up", (E, inter, H)), ("down", (E, H, inter))):
            merged = spec(p + f"ffn_{which}_exps.weight", shape)
            if cfg.split_experts:
                yield from _split(merged, i, which)
            else:
                yield merged
        if cfg.n_shared:
            S = cfg.shared_ffn
            if cfg.arch == "qwen2moe":
                yield spec(p + "ffn_gate_inp_shexp.weight", (H,), "linear", F32)
            yield spec(p + "ffn_gate_shexp.weight", (S, H))
            yield spec(p + "ffn_up_shexp.weight", (S, H))
            yield spec(p + "ffn_down_shexp.weight", (H, S))
    yield spec("output_norm.weight", (H,), "norm")
    yield spec("output.weight", (V, H))


def _split_kv_b(cfg: SynthConfig, kv_b: _TensorSpec, layer: int) -> Iterator[_TensorSpec]:
    """attn_k_b / attn_v_b of block `layer` as llama.cpp's DeepseekV2Model.modify_tensors makes
    them from kv_b_proj: view (heads, nope + v, kv_lora), split into k (heads, nope, kv_lora) and
    v (heads, v, kv_lora), k transposed per head to (heads, kv_lora, nope); k_b first. Values: the
    dequantized attn_kv_b (the weights the other layout holds), stored F32."""
    H, nope, v = cfg.n_heads, cfg.qk_nope_dim, cfg.v_head_dim
    memo: dict[str, np.ndarray] = {}

    def parts() -> tuple[np.ndarray, np.ndarray]:
        if "k" not in memo:
            raw = kv_b.make()
            w = raw if kv_b.qtype == F32 else formats.dequantize(raw, kv_b.qtype, kv_b.shape)
            w = np.asarray(w, np.float32).reshape(H, nope + v, cfg.kv_lora_rank)
            memo["k"] = np.ascontiguousarray(w[:, :nope].transpose(0, 2, 1))
            memo["v"] = np.ascontiguousarray(w[:, nope:])
        return memo["k"], memo["v"]

    p = f"blk.{layer}."
    yield _TensorSpec(p + "attn_k_b.weight", (H, cfg.kv_lora_rank, nope), F32, lambda: parts()[0], lambda: parts()[0])
    yield _TensorSpec(p + "attn_v_b.weight", (H, v, cfg.kv_lora_rank), F32, lambda: parts()[1], lambda: parts()[1])


def _split(merged: _TensorSpec, layer: int, which: str) -> Iterator[_TensorSpec]:
    """The per-expert tensors blk.L.ffn_{which}.E.weight holding `merged`'s data (generated once)."""
    memo: dict[str, np.ndarray] = {}
    last = merged.shape[0] - 1

    def part(kind: str, e: int) -> np.ndarray:
        if kind not in memo:
            memo.clear()  # one of the two at a time: a writer asks for blocks, a test for floats
            memo[kind] = merged.make() if kind == "blocks" else merged.make_float()
        out = memo[kind][e].copy()
        if e == last:  # a writer goes in order: let the layer's data go (regenerated if asked again)
            memo.clear()
        return out

    for e in range(merged.shape[0]):
        yield _TensorSpec(split_expert_name(layer, which, e), merged.shape[1:], merged.qtype,
                          lambda e=e: part("blocks", e), lambda e=e: part("float", e))


def tensor_specs(cfg: SynthConfig) -> dict[str, _TensorSpec]:
    """name -> spec (with a `make()` that regenerates exactly the data written to the file)."""
    return {s.name: s for s in _specs(cfg)}


def write_gguf(cfg: SynthConfig, path: str | os.PathLike, progress: bool = False) -> str:
    """Write the model described by `cfg` to `path` (GGUF v3). Returns the path."""
    path = os.fspath(path)
    tokens, merges, ttypes = build_tokenizer()
    arch = cfg.arch
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"hybrimoe synthetic {cfg.name}")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden)
    w.add_feed_forward_length(cfg.dense_ffn or cfg.expert_ffn)
    w.add_head_count(cfg.n_heads)
    # MLA in the split layout is multi-query attention over the latent: one kv head (the converter)
    w.add_head_count_kv(1 if arch == "deepseek2" and cfg.mla_split else cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(len(tokens))
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_expert_feed_forward_length(cfg.expert_ffn)
    if cfg.n_shared or arch == "deepseek2":  # llama.cpp requires the key for deepseek2, even 0
        w.add_expert_shared_count(cfg.n_shared)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_ffn)
    if cfg.norm_topk is not None:
        w.add_expert_weights_norm(cfg.norm_topk)
    if arch == "deepseek2":
        w.add_leading_dense_block_count(cfg.leading_dense)
        w.add_expert_weights_scale(cfg.routed_scale)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.gating == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        # llama.cpp requires q_lora_rank unless block_count is 26 or 27 (its "lite" guess);
        # 0 = no q LoRA (attn_q), as our reader and llama.cpp both read it
        w.add_q_lora_rank(0)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        if cfg.mla_split:
            w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_dim)
            w.add_value_length(cfg.kv_lora_rank)
            w.add_key_length_mla(cfg.qk_nope_dim + cfg.qk_rope_dim)
            w.add_value_length_mla(cfg.v_head_dim)
        else:
            w.add_key_length(cfg.qk_nope_dim + cfg.qk_rope_dim)
            w.add_value_length(cfg.v_head_dim)
        w.add_rope_dimension_count(cfg.qk_rope_dim)
    else:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(1)  # end of a chat turn: the same token (in llama.cpp's end-of-generation set)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    # Synthetic-model provenance, so a loader can rebuild the float weights for tests.
    w.add_string("hybrimoe.synth.config", repr(dataclasses.asdict(cfg)))

    specs = list(_specs(cfg))
    for s in specs:
        if s.qtype == F32:
            w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), int(np.prod(s.shape)) * 4)
        else:
            rb = formats.row_bytes(s.qtype, s.shape[-1], s.name)
            byte_shape = (*s.shape[:-1], rb)
            w.add_tensor_info(s.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=T(s.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    it = specs
    if progress:
        from tqdm import tqdm

        it = tqdm(specs, desc=f"writing {os.path.basename(path)}", unit="tensor")
    for s in it:
        data = s.make()
        w.write_tensor_data(np.ascontiguousarray(data))
    w.close()
    return path


# Bumped whenever the bytes write_gguf produces for a preset change, so that a cached file written
# by an older release is not reused: 2 = the llama.cpp keys (q_lora_rank, expert_shared_count) and
# the <|endoftext|> end token with eos/eot ids.
WRITER_REVISION = 2


def default_cache_dir() -> str:
    return os.environ.get("HYBRIMOE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hybrimoe"))


def ensure_preset(name: str = "tiny", n_layers: int | None = None, cache_dir: str | None = None,
                  progress: bool = False) -> str:
    """Path of the preset's GGUF in the cache directory, writing it first if absent."""
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if n_layers is not None:
        cfg = cfg.with_layers(n_layers)
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    from . import __version__

    path = os.path.join(cache_dir, f"synth-{name}-L{cfg.n_layers}-v{__version__}-r{WRITER_REVISION}.gguf")
    if not os.path.exists(path):
        tmp = path + f".tmp{os.getpid()}"
        write_gguf(cfg, tmp, progress=progress)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written model in the cache
    return path
