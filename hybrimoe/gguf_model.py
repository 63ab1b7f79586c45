"""Open a GGUF MoE model: metadata, MoE hyper-parameters and tensors, with clean errors.

`GGUFModel(path)` memory-maps the file once through `gguf.GGUFReader` (nothing is read twice:
tensor data stay views into the map). Supported architectures and what differs between them:

    arch       routing                      top-k weights           shared experts
    deepseek2  softmax (or sigmoid if set)  renormalised if set     ffn_*_shexp (no gate)
    qwen2moe   softmax                      not renormalised        ffn_*_shexp, sigmoid gate
    qwen3moe   softmax                      renormalised            none
    llama      softmax (Mixtral)            renormalised            none
    olmoe      softmax                      not renormalised        none

Routed experts are read from the 3-D tensors `blk.L.ffn_{gate,up,down}_exps.weight`, or from one
2-D tensor per expert, `blk.L.ffn_{gate,up,down}.E.weight`, as in GGUF files converted before
llama.cpp merged them (many Mixtral files): `expert_tensors`.

Every error names the file and the key or tensor, what was expected and what was found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize

from .errors import GGUFFormatError, ModelConfigError, QuantShapeError, UnsupportedQuantError

SUPPORTED_ARCHS = ("deepseek2", "qwen2moe", "qwen3moe", "llama", "olmoe")

# Per-arch defaults where the GGUF converter does not write a key.
_ROUTING_DEFAULTS = {
    # arch: (renormalise top-k weights, shared expert has a sigmoid gate)
    "deepseek2": (False, False),
    "qwen2moe": (False, True),
    "qwen3moe": (True, False),
    "llama": (True, False),
    "olmoe": (False, False),
}


def split_expert_name(layer: int, which: str, e: int) -> str:
    """Name of one expert's matrix in the older per-expert layout: blk.L.ffn_{gate,up,down}.E.weight."""
    return f"blk.{layer}.ffn_{which}.{e}.weight"


@dataclass(frozen=True)
class MoEConfig:
    """MoE hyper-parameters of a model, read from GGUF metadata.

    moe_layers: indices of the blocks whose FFN is a routed MoE (deepseek2's first
    `leading_dense_block_count` blocks are dense).
    """

    arch: str
    n_layers: int
    hidden: int
    n_experts: int
    top_k: int
    expert_ffn: int
    n_shared: int = 0
    shared_ffn: int = 0
    shared_gate: bool = False
    gating: str = "softmax"  # or "sigmoid"
    norm_topk: bool = False
    routed_scale: float = 1.0
    leading_dense: int = 0
    dense_ffn: int = 0
    vocab_size: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    context_length: int = 0
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(self.leading_dense, self.n_layers))


# Smallest encoded sizes (bytes), for checking a count against the bytes left before looping.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (no dims, empty name)
_MIN_ARRAY_ITEM_BYTES = {int(GGUFValueType.STRING): 8, int(GGUFValueType.ARRAY): 4 + 8}
_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses tensors with more


class _CheckedReader(GGUFReader):
    """GGUFReader that checks every count against the bytes left before looping over it (key/value
    count, tensor count, array lengths), and every tensor's type, dims, alignment and byte range
    before building views, so a lying header ends in a GGUFFormatError naming the key or tensor,
    never a huge allocation or a long loop over garbage."""

    def __init__(self, path: str):
        self._hm_path = path
        self._hm_key = "?"
        super().__init__(path, "r")

    # gguf keeps the file as an np.memmap and slices it once per header value; memmap's Python-level
    # __getitem__/__array_finalize__ cost more than the parsing itself. We parse a plain ndarray view
    # of the same map (median open of the tiny model, 15 runs: gguf.GGUFReader 0.058 s, this
    # reader with all its checks 0.034 s; 2-core Zen 3, shared). Tensor data stay zero-copy
    # views of the map (the view keeps the memmap alive through .base).
    @property
    def data(self):
        return self._hm_data

    @data.setter
    def data(self, value):
        self._hm_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def _hm_room(self, what: str, count: int, min_bytes: int, offs: int) -> None:
        left = len(self.data) - int(offs)
        if count * min_bytes > left:
            raise GGUFFormatError(
                f"{self._hm_path}: {what} is {count}, but the {left} bytes left in the file hold at most "
                f"{max(left, 0) // min_bytes} (at least {min_bytes} bytes each): truncated or corrupt file")

    def _build_fields(self, offs, count):  # noqa: D401 - overrides gguf internals
        count = int(count)
        self._hm_room("GGUF.kv_count (metadata keys)", count, _MIN_KV_BYTES, offs)
        for _ in range(count):
            # Parse one key at a time so an error inside its value can name the key.
            klen = int(self._get(offs, np.uint64)[0])
            self._hm_room("a metadata key's length", klen, 1, offs + 8)
            self._hm_key = bytes(self._get(offs + 8, np.uint8, klen)).decode("utf-8", "replace")
            offs = super()._build_fields(offs, 1)
        self._hm_key = "?"
        return offs

    def _get_field_parts(self, orig_offs, raw_type):  # noqa: D401 - overrides gguf internals
        if int(raw_type) == int(GGUFValueType.ARRAY):
            item = int(self._get(orig_offs, np.uint32)[0])
            n = int(self._get(orig_offs + 4, np.uint64)[0])
            try:
                size = _MIN_ARRAY_ITEM_BYTES.get(item) or np.dtype(self.gguf_scalar_to_np[GGUFValueType(item)]).itemsize
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{self._hm_path}: metadata key {self._hm_key!r}: array of unknown value "
                                      f"type {item}") from None
            self._hm_room(f"metadata key {self._hm_key!r}: array length", n, size, orig_offs + 12)
        elif int(raw_type) == int(GGUFValueType.STRING):
            self._hm_room(f"metadata key {self._hm_key!r}: string length", int(self._get(orig_offs, np.uint64)[0]),
                          1, orig_offs + 8)
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensor_info(self, offs, count):  # noqa: D401 - overrides gguf internals
        self._hm_room("GGUF.tensor_count", int(count), _MIN_TENSOR_INFO_BYTES, offs)
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs, fields):  # noqa: D401 - overrides gguf internals
        size = len(self.data)
        align = int(self.alignment)
        for f in fields:
            _nl, name_data, _nd, dims, raw_dtype, offset_tensor = f.parts
            name = bytes(name_data[:200]).decode("utf-8", "replace")  # a lying length: name only the start
            try:
                qt = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise UnsupportedQuantError(
                    f"{self._hm_path}: tensor {name!r} has unknown ggml type id {int(raw_dtype[0])}"
                ) from None
            bs, ts = GGML_QUANT_SIZES[qt]
            if not 1 <= len(dims) <= _MAX_DIMS:
                raise GGUFFormatError(f"{self._hm_path}: tensor {name!r} has {len(dims)} dims, expected 1 to "
                                      f"{_MAX_DIMS}")
            dims_l = [int(d) for d in dims]
            if any(d <= 0 for d in dims_l):
                raise GGUFFormatError(f"{self._hm_path}: tensor {name!r} has invalid dims {dims_l} "
                                      "(expected positive sizes)")
            if dims_l[0] % bs:
                raise QuantShapeError(
                    f"{self._hm_path}: tensor {name!r}: row length {dims_l[0]} is not a multiple of "
                    f"{qt.name}'s block size {bs}"
                )
            rel = int(offset_tensor[0])
            if rel % align:
                # The GGUF spec requires it and llama.cpp refuses such files: reading from there
                # would run on shifted bytes.
                raise GGUFFormatError(
                    f"{self._hm_path}: tensor {name!r}: data offset {rel} is not a multiple of "
                    f"general.alignment ({align}): corrupt file")
            n = 1
            for d in dims_l:
                n *= d
            nbytes = n * ts // bs
            off = int(start_offs) + rel
            if off + nbytes > size:
                raise GGUFFormatError(
                    f"{self._hm_path}: tensor {name!r} data [{off}, {off + nbytes}) runs past the end "
                    f"of the file ({size} bytes): truncated or corrupt file"
                )
        super()._build_tensors(start_offs, fields)


class GGUFModel:
    """A memory-mapped GGUF file with MoE metadata.

    Attributes: path, reader (gguf.GGUFReader), arch, config (MoEConfig), tensors (name -> ReaderTensor).
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        if os.path.isdir(path):
            raise GGUFFormatError(f"{path}: is a directory, expected a .gguf file")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise GGUFFormatError(f"{path}: not a GGUF file (expected magic b'GGUF', found {magic!r})")
        try:
            self.reader = _CheckedReader(path)
        except (GGUFFormatError, UnsupportedQuantError, QuantShapeError):
            raise
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError,
                ZeroDivisionError) as e:
            raise GGUFFormatError(f"{path}: unreadable GGUF header or tensor table ({type(e).__name__}: {e}); "
                                  "the file is truncated or corrupt") from None
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture", str)
        self.config = self._read_config()

    # ---- metadata -------------------------------------------------------------------------
    _MISSING = object()

    def get(self, key: str, typ=None, default=_MISSING):
        """Metadata value for `key` (arrays as lists); raises ModelConfigError if absent and no default."""
        f = self.reader.fields.get(key)
        if f is None:
            if default is GGUFModel._MISSING:
                raise ModelConfigError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            val = f.contents()
        except UnicodeDecodeError as e:
            raise ModelConfigError(f"{self.path}: metadata key {key!r}: not valid UTF-8 ({e})") from None
        if typ is not None and val is not None:
            try:
                val = typ(val)
            except (TypeError, ValueError):
                raise ModelConfigError(f"{self.path}: metadata key {key!r}: expected {typ.__name__}, "
                                       f"found {val!r}") from None
        return val

    def _key(self, suffix: str, typ=int, default=_MISSING):
        return self.get(f"{self.arch}.{suffix}", typ, default)

    def _read_config(self) -> MoEConfig:
        arch = self.arch
        if arch not in SUPPORTED_ARCHS:
            raise ModelConfigError(
                f"{self.path}: general.architecture is {arch!r}; supported MoE architectures are "
                f"{', '.join(SUPPORTED_ARCHS)}"
            )
        n_experts = self._key("expert_count", int, 0)
        if n_experts <= 0:
            raise ModelConfigError(
                f"{self.path}: {arch}.expert_count is {n_experts}: this model has no experts "
                "(expected a Mixture-of-Experts model)"
            )
        n_layers = self._key("block_count")
        hidden = self._key("embedding_length")
        leading_dense = self._key("leading_dense_block_count", int, 0)
        self._check_blocks(n_layers, leading_dense)
        top_k = self._key("expert_used_count")
        if not 0 < top_k <= n_experts:
            raise ModelConfigError(f"{self.path}: {arch}.expert_used_count must be in 1..{n_experts}, found {top_k}")
        ffn = self._key("feed_forward_length", int, 0)
        expert_ffn = self._key("expert_feed_forward_length", int, 0) or ffn
        norm_default, shared_gate = _ROUTING_DEFAULTS[arch]
        gating_id = self._key("expert_gating_func", int, 1)
        n_shared = self._key("expert_shared_count", int, 0)
        shared_ffn = self._key("expert_shared_feed_forward_length", int, 0)
        if arch == "deepseek2" and n_shared:
            shared_ffn = shared_ffn or n_shared * expert_ffn
        if arch == "qwen2moe" and "blk.0.ffn_up_shexp.weight" in self.tensors:
            n_shared = n_shared or 1
            shared_ffn = shared_ffn or int(self.tensors["blk.0.ffn_up_shexp.weight"].shape[1])
        n_heads = self._key("attention.head_count", int, 0)
        n_kv_heads = self._key("attention.head_count_kv", int, n_heads)
        vocab = self._check_embedding(hidden)
        self._check_heads(hidden, n_heads, n_kv_heads)
        cfg = MoEConfig(
            arch=arch,
            n_layers=n_layers,
            hidden=hidden,
            n_experts=n_experts,
            top_k=top_k,
            expert_ffn=expert_ffn,
            n_shared=n_shared,
            shared_ffn=shared_ffn,
            shared_gate=shared_gate and n_shared > 0,
            gating={1: "softmax", 2: "sigmoid"}.get(gating_id, "softmax"),
            norm_topk=bool(self._key("expert_weights_norm", bool, norm_default)),
            routed_scale=float(self._key("expert_weights_scale", float, 1.0)),
            leading_dense=leading_dense,
            dense_ffn=ffn,
            vocab_size=vocab,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            context_length=self._count("context_length", self._key("context_length", int, 0), 0, 1 << 24),
            rope_theta=float(self._key("rope.freq_base", float, 10000.0)),
            rms_eps=float(self._key("attention.layer_norm_rms_epsilon", float, 1e-6)),
        )
        self._check_experts(cfg)
        return cfg

    # ---- counts checked against the tensor table before anything is sized by them -----------
    def _count(self, suffix: str, value: int, lo: int, hi: int, why: str = "") -> int:
        if not lo <= value <= hi:
            raise ModelConfigError(f"{self.path}: {self.arch}.{suffix} is {value}, expected {lo}..{hi}"
                                   + (f" ({why})" if why else ""))
        return value

    def _dims(self, name: str) -> tuple[int, ...] | None:
        t = self.tensors.get(name)
        return None if t is None else tuple(int(d) for d in t.shape)

    def _check_blocks(self, n_layers: int, leading_dense: int) -> None:
        """block_count against the blk.N.* tensors the file holds; leading dense blocks within it."""
        blocks = set()
        for name in self.tensors:
            if name.startswith("blk."):
                head = name[4:].split(".", 1)[0]
                if head.isdigit():
                    blocks.add(int(head))
        self._count("block_count", n_layers, 1, len(blocks),
                    f"the file holds tensors for {len(blocks)} blocks"
                    + (f", blk.{min(blocks)} .. blk.{max(blocks)}" if blocks else ""))
        missing = next((i for i in range(n_layers) if i not in blocks), None)
        if missing is not None:
            raise ModelConfigError(f"{self.path}: {self.arch}.block_count is {n_layers} but the file has no "
                                   f"tensor blk.{missing}.* (expected every block 0..{n_layers - 1})")
        self._count("leading_dense_block_count", leading_dense, 0, n_layers - 1,
                    f"block_count is {n_layers} and at least one block must be MoE")

    def _check_embedding(self, hidden: int) -> int:
        """token_embd.weight (hidden, vocab) against embedding_length, vocab_size and the token list;
        returns the vocabulary size."""
        dims = self._dims("token_embd.weight")
        if dims is None:
            raise ModelConfigError(f"{self.path}: tensor 'token_embd.weight' is missing")
        if len(dims) != 2 or dims[0] != hidden:
            raise ModelConfigError(f"{self.path}: tensor 'token_embd.weight' has dims {dims}, expected "
                                   f"({hidden}, vocab) from {self.arch}.embedding_length={hidden}")
        vocab = dims[1]
        meta = self._key("vocab_size", int, None)
        if meta is not None and meta != vocab:
            raise ModelConfigError(f"{self.path}: {self.arch}.vocab_size is {meta} but token_embd.weight has "
                                   f"{vocab} rows (expected equal)")
        f = self.reader.fields.get("tokenizer.ggml.tokens")
        if f is not None and len(f.data) != vocab:
            raise ModelConfigError(f"{self.path}: tokenizer.ggml.tokens holds {len(f.data)} tokens but "
                                   f"token_embd.weight has {vocab} rows (expected equal)")
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                    "tokenizer.ggml.eom_token_id", "tokenizer.ggml.unknown_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.seperator_token_id"):
            i = self.get(key, int, None)
            if i is not None and not 0 <= i < vocab:
                raise ModelConfigError(f"{self.path}: {key} is {i}, expected 0..{vocab - 1} (a token id)")
        for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            g = self.reader.fields.get(key)
            if g is not None and len(g.data) != vocab:
                raise ModelConfigError(f"{self.path}: {key} has {len(g.data)} entries, expected {vocab} "
                                       "(one per token)")
        return vocab

    def _check_heads(self, hidden: int, n_heads: int, n_kv_heads: int) -> None:
        """Head counts and head dims against block 0's attention tensors."""
        self._count("attention.head_count", n_heads, 1, hidden)
        self._count("attention.head_count_kv", n_kv_heads, 1, n_heads)
        if n_heads % n_kv_heads:
            raise ModelConfigError(f"{self.path}: {self.arch}.attention.head_count {n_heads} is not a multiple of "
                                   f"attention.head_count_kv {n_kv_heads}")
        key_len = self._key("attention.key_length", int, 0)
        val_len = self._key("attention.value_length", int, 0)

        def want(name: str, expected: tuple[int, ...], why: str) -> None:
            got = self._dims(name)
            if got is None:
                raise ModelConfigError(f"{self.path}: tensor {name!r} is missing")
            if got != expected:
                raise ModelConfigError(f"{self.path}: tensor {name!r} has dims {got}, expected {expected} "
                                       f"from metadata {why}")

        if self.arch == "deepseek2":
            kv_lora = self._key("attention.kv_lora_rank", int, None)
            if kv_lora is None:
                raise ModelConfigError(f"{self.path}: metadata key 'deepseek2.attention.kv_lora_rank' is missing")
            rope = self._key("rope.dimension_count", int, None)
            if rope is None:
                raise ModelConfigError(f"{self.path}: metadata key 'deepseek2.rope.dimension_count' is missing")
            qk = self._key("attention.key_length_mla", int, 0) or key_len
            self._count("attention.kv_lora_rank", kv_lora, 1, 1 << 20)
            self._count("attention.key_length" + ("_mla" if self._key("attention.key_length_mla", int, 0) else ""),
                        qk, 1, 1 << 16)
            self._count("rope.dimension_count", rope, 2, qk, "part of each query/key head")
            want("blk.0.attn_kv_a_mqa.weight", (hidden, kv_lora + rope),
                 f"embedding_length={hidden}, kv_lora_rank={kv_lora} + rope.dimension_count={rope}")
            q = "blk.0.attn_q_b.weight" if "blk.0.attn_q_b.weight" in self.tensors else "blk.0.attn_q.weight"
            dims = self._dims(q)
            if dims is None or len(dims) != 2 or dims[1] != n_heads * qk:
                raise ModelConfigError(f"{self.path}: tensor {q!r} has dims {dims}, expected (*, {n_heads * qk}) "
                                       f"from metadata head_count={n_heads} x key length {qk}")
            return
        head = key_len or hidden // n_heads
        self._count("attention.key_length", head, 1, 1 << 16)
        if val_len and val_len != head:
            self._count("attention.value_length", val_len, head, head, "transformers' classes have one head_dim")
        want("blk.0.attn_q.weight", (hidden, n_heads * head), f"embedding_length={hidden}, head_count={n_heads} x "
             f"head dim {head}")
        want("blk.0.attn_k.weight", (hidden, n_kv_heads * head), f"embedding_length={hidden}, head_count_kv="
             f"{n_kv_heads} x head dim {head}")

    def _check_experts(self, cfg: MoEConfig) -> None:
        found_any = False
        for layer in cfg.moe_layers:
            for which, rows, cols in (("gate", cfg.expert_ffn, cfg.hidden), ("up", cfg.expert_ffn, cfg.hidden),
                                      ("down", cfg.hidden, cfg.expert_ffn)):
                name = f"blk.{layer}.ffn_{which}_exps.weight"
                t = self.tensors.get(name)
                if t is None and split_expert_name(layer, which, 0) in self.tensors:
                    self._check_split_experts(cfg, layer, which, rows, cols)
                    found_any = True
                    continue
                if t is None:
                    raise ModelConfigError(f"{self.path}: expert tensor {name!r} is missing "
                                           f"(layer {layer} should be MoE: {cfg.arch}.block_count={cfg.n_layers}, "
                                           f"leading_dense_block_count={cfg.leading_dense})")
                found_any = True
                want = (cols, rows, cfg.n_experts)  # GGUF order: ne0 = row length
                got = tuple(int(d) for d in t.shape)
                if got != want:
                    raise ModelConfigError(
                        f"{self.path}: tensor {name!r} has dims {got}, expected {want} "
                        f"(row length, rows, experts) from metadata expert_count={cfg.n_experts}, "
                        f"embedding_length={cfg.hidden}, expert_feed_forward_length={cfg.expert_ffn}"
                    )
            router = self.tensors.get(f"blk.{layer}.ffn_gate_inp.weight")
            if router is None:
                raise ModelConfigError(f"{self.path}: router tensor 'blk.{layer}.ffn_gate_inp.weight' is missing")
            if tuple(int(d) for d in router.shape) != (cfg.hidden, cfg.n_experts):
                raise ModelConfigError(
                    f"{self.path}: router 'blk.{layer}.ffn_gate_inp.weight' has dims "
                    f"{tuple(int(d) for d in router.shape)}, expected ({cfg.hidden}, {cfg.n_experts}): "
                    "inconsistent expert counts"
                )
        if not found_any:
            raise ModelConfigError(f"{self.path}: no routed-expert tensors found")

    def _check_split_experts(self, cfg: MoEConfig, layer: int, which: str, rows: int, cols: int) -> None:
        """A layer in the older layout: one 2-D tensor per expert, all present, same shape and type."""
        types = set()
        for e in range(cfg.n_experts):
            name = split_expert_name(layer, which, e)
            t = self.tensors.get(name)
            if t is None:
                raise ModelConfigError(f"{self.path}: expert tensor {name!r} is missing (layer {layer} stores "
                                       f"one tensor per expert; expert_count={cfg.n_experts})")
            got = tuple(int(d) for d in t.shape)
            if got != (cols, rows):
                raise ModelConfigError(
                    f"{self.path}: tensor {name!r} has dims {got}, expected {(cols, rows)} (row length, rows) "
                    f"from metadata embedding_length={cfg.hidden}, expert_feed_forward_length={cfg.expert_ffn}")
            types.add(t.tensor_type.name)
        if len(types) > 1:
            raise ModelConfigError(f"{self.path}: the experts of blk.{layer}.ffn_{which} have different types "
                                   f"({', '.join(sorted(types))}); one type per layer and matrix is supported")

    def expert_tensors(self, layer: int, which: str) -> tuple[list[str], int, "np.ndarray | list[np.ndarray]"]:
        """(tensor names, GGML type, data) of MoE layer `layer`'s routed `which` ('gate', 'up' or
        'down') matrices. data: uint8 (E, rows, row_bytes), the 3-D tensor
        `blk.L.ffn_{which}_exps.weight`; or, in files converted before llama.cpp merged experts
        (e.g. the widely shared Mixtral GGUFs of early 2024), a list of E (rows, row_bytes) views of
        the tensors `blk.L.ffn_{which}.E.weight`. Both are zero-copy views into the map."""
        name = f"blk.{layer}.ffn_{which}_exps.weight"
        t = self.tensors.get(name)
        if t is not None:
            return [name], int(t.tensor_type), t.data
        names = [split_expert_name(layer, which, e) for e in range(self.config.n_experts)]
        ts = [self.tensor_info(n) for n in names]
        return names, int(ts[0].tensor_type), [t.data for t in ts]

    # ---- tensors ------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor_info(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise ModelConfigError(f"{self.path}: tensor {name!r} is missing")
        return t

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view of a tensor's bytes/values as gguf lays them out (numpy order)."""
        return self.tensor_info(name).data

    def dequant(self, name: str) -> np.ndarray:
        """Tensor as float32 in numpy order (e.g. a (out, in) weight matrix), through gguf."""
        t = self.tensor_info(name)
        try:
            out = _gguf_dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnsupportedQuantError(f"{self.path}: tensor {name!r}: cannot dequantize "
                                        f"{t.tensor_type.name}") from None
        out = np.asarray(out, dtype=np.float32)
        return out if out.flags.writeable else out.copy()  # F32 tensors come back as read-only map views

    @cached_property
    def chat_template(self) -> str | None:
        return self.get("tokenizer.chat_template", str, None)

    def __repr__(self) -> str:
        c = self.config
        return (f"GGUFModel({os.path.basename(self.path)!r}, arch={c.arch}, layers={c.n_layers}, "
                f"hidden={c.hidden}, experts={c.n_experts} top-{c.top_k}, expert_ffn={c.expert_ffn}, "
                f"shared={c.n_shared})")
