"""GGUF loading (GGUFModel, ExpertStore) on synthetic files, and every bad-input case."""

import dataclasses
import os
import shutil
import time

import gguf
import numpy as np
import pytest
import torch

from hybrimoe import formats, synth
from hybrimoe.errors import GGUFFormatError, ModelConfigError, QuantShapeError, UnsupportedQuantError
from hybrimoe.gguf_model import GGUFModel
from hybrimoe.reference import RoutingConfig, moe_forward
from hybrimoe.store import ExpertStore


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return synth.write_gguf(synth.PRESETS["tiny"], tmp_path_factory.mktemp("m") / "tiny.gguf")


def _copy(src, tmp_path, name="m.gguf"):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return str(dst)


# ------------------------------------------------------------------------------- loading -----
def test_tiny_metadata_and_store(tiny_path):
    m = GGUFModel(tiny_path)
    cfg, pre = m.config, synth.PRESETS["tiny"]
    assert (cfg.arch, cfg.n_layers, cfg.hidden, cfg.n_experts, cfg.top_k, cfg.expert_ffn) == (
        "deepseek2", pre.n_layers, pre.hidden, pre.n_experts, pre.top_k, pre.expert_ffn)
    assert cfg.moe_layers == tuple(range(pre.leading_dense, pre.n_layers))
    assert cfg.n_shared == 1 and cfg.shared_ffn == pre.shared_ffn and cfg.leading_dense == 1
    store = ExpertStore(m)
    types = set()
    for layer in store.layers:
        lay = store.layout(layer)
        types |= {lay.gate_type, lay.up_type, lay.down_type}
        w = store.expert(layer, pre.n_experts - 1)
        assert w.gate.shape == (pre.expert_ffn, pre.hidden) and w.down.shape == (pre.hidden, pre.expert_ffn)
    # 160-wide down projections fall back to Q5_0 / Q8_0 as in DeepSeek-V2-Lite's Q4_K_M file
    assert types == {formats.Q4_K, formats.Q5_0, formats.Q8_0}
    file_types = {int(t.tensor_type) for t in m.reader.tensors}
    assert set(formats.EXPERT_QTYPES) <= file_types  # Q6_K appears too (output.weight)


def test_expert_views_are_zero_copy_and_pack_preserves_bytes(tiny_path):
    m = GGUFModel(tiny_path)
    store = ExpertStore(m)
    layer = store.layers[0]
    w = store.expert(layer, 5)
    assert np.shares_memory(w.gate.data, m.raw(f"blk.{layer}.ffn_gate_exps.weight"))
    store.pack([layer], pin=False)
    w2 = store.expert(layer, 5)
    assert not np.shares_memory(w2.gate.data, m.raw(f"blk.{layer}.ffn_gate_exps.weight"))
    for a, b in zip((w.gate, w.up, w.down), (w2.gate, w2.up, w2.down)):
        assert np.array_equal(a.data, b.data) and a.qtype == b.qtype and a.shape == b.shape
    span = store.span(layer, 5)
    lay = store.layout(layer)
    assert span.shape == (lay.nbytes,)
    assert np.shares_memory(span, w2.down.data)


def test_quantize_write_read_dequant_round_trip(tiny_path):
    """The bytes in the file are exactly what the quantizer produced from the seeded floats, and
    dequantizing them gives the floats back within the format's noise (SQNR bounds below)."""
    cfg = synth.PRESETS["tiny"]
    specs = synth.tensor_specs(cfg)
    m = GGUFModel(tiny_path)
    store = ExpertStore(m)
    min_sqnr = {formats.Q4_K: 17.0, formats.Q5_0: 22.0, formats.Q8_0: 38.0}  # dB, gaussian weights
    for layer in store.layers:
        for which in ("gate", "up", "down"):
            name = f"blk.{layer}.ffn_{which}_exps.weight"
            spec = specs[name]
            assert np.array_equal(m.raw(name), spec.make())
            ref = spec.make_float()
            e = 3
            got = getattr(store.expert(layer, e), which).dequantize()
            assert formats.sqnr_db(ref[e], got) > min_sqnr[spec.qtype], name
    # non-expert tensors through gguf's dequantizer
    assert np.array_equal(m.dequant("blk.1.ffn_gate_inp.weight"), specs["blk.1.ffn_gate_inp.weight"].make())


@pytest.mark.parametrize("preset", ["tiny-qwen2moe", "tiny-qwen3moe", "tiny-mixtral", "tiny-olmoe"])
def test_every_arch_preset_loads(preset, tmp_path):
    cfg = synth.PRESETS[preset]
    m = GGUFModel(synth.write_gguf(cfg, tmp_path / f"{preset}.gguf"))
    c = m.config
    assert (c.arch, c.n_layers, c.hidden, c.n_experts, c.top_k, c.expert_ffn) == (
        cfg.arch, cfg.n_layers, cfg.hidden, cfg.n_experts, cfg.top_k, cfg.expert_ffn)
    assert c.norm_topk == {"qwen2moe": False, "qwen3moe": True, "llama": True, "olmoe": False}[cfg.arch]
    assert c.shared_gate == (cfg.arch == "qwen2moe")
    if cfg.arch == "qwen2moe":
        assert c.shared_ffn == cfg.shared_ffn
    store = ExpertStore(m)
    assert store.layers == tuple(range(cfg.n_layers))
    assert store.expert(0, 0).gate.shape == (cfg.expert_ffn, cfg.hidden)


@pytest.mark.parametrize("preset", ["dsv2-lite", "mixtral", "qwen3-30b-a3b"])
def test_real_shaped_presets_with_few_layers(preset, tmp_path):
    cfg = synth.PRESETS[preset].with_layers(synth.PRESETS[preset].leading_dense + 1)
    if preset == "mixtral":  # one layer of Mixtral is 0.45 GB of expert weights; keep the test light
        cfg = synth.dataclasses.replace(cfg, expert_ffn=14336 // 4)
    m = GGUFModel(synth.write_gguf(cfg, tmp_path / "m.gguf"))
    store = ExpertStore(m)
    layer = store.layers[0]
    lay = store.layout(layer)
    assert (lay.hidden, lay.inter) == (cfg.hidden, cfg.expert_ffn)
    if preset == "dsv2-lite":  # 1408-wide rows: Q5_0 or Q8_0 down, as in the real Q4_K_M file
        assert lay.gate_type == formats.Q4_K and lay.down_type in (formats.Q5_0, formats.Q8_0)
    # random blocks are well scaled: weight std ~ 1/sqrt(fan_in) within a factor of 2
    g = store.expert(layer, 1).gate.dequantize()
    assert 0.5 < g.std() * np.sqrt(cfg.hidden) < 2.0


def test_reference_forward_on_loaded_weights(tiny_path):
    m = GGUFModel(tiny_path)
    store = ExpertStore(m)
    layer = store.layers[0]
    experts = {e: tuple(torch.from_numpy(a) for a in store.dequant_expert(layer, e)) for e in range(8)}
    x = torch.randn(5, m.config.hidden)
    router = torch.from_numpy(m.dequant(f"blk.{layer}.ffn_gate_inp.weight"))
    y, ids, w, probs = moe_forward(x, router, experts, RoutingConfig.from_moe_config(m.config))
    assert y.shape == (5, m.config.hidden) and ids.shape == (5, m.config.top_k)
    # check one token by hand: the loop over its experts
    t = 2
    by_hand = torch.zeros(m.config.hidden)
    for j in range(m.config.top_k):
        g, u, d = experts[int(ids[t, j])]
        by_hand += w[t, j] * ((torch.nn.functional.silu(x[t] @ g.T) * (x[t] @ u.T)) @ d.T)
    torch.testing.assert_close(y[t], by_hand, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input -----
def _tensor_field(path, name):
    r = gguf.GGUFReader(path, "r+")
    t = next(t for t in r.tensors if t.name == name)
    return r, t.field


def test_missing_file_and_not_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        GGUFModel(tmp_path / "nope.gguf")
    p = tmp_path / "junk.gguf"
    p.write_bytes(os.urandom(1000))
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        GGUFModel(p)
    with pytest.raises(GGUFFormatError, match="directory"):
        GGUFModel(tmp_path)


def test_truncated_file(tiny_path, tmp_path):
    data = open(tiny_path, "rb").read()
    for cut in (len(data) - 1000, len(data) // 2):  # inside the tensor data
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match="runs past the end") as ei:
            GGUFModel(p)
        assert str(p) in str(ei.value)
    p = tmp_path / "header.gguf"
    p.write_bytes(data[:300])  # inside the metadata
    with pytest.raises(GGUFFormatError, match="truncated or corrupt"):
        GGUFModel(p)


def test_tensor_offset_past_end_names_tensor(tiny_path, tmp_path):
    p = _copy(tiny_path, tmp_path)
    r, f = _tensor_field(p, "blk.2.ffn_up_exps.weight")
    f.parts[5][0] = 1 << 40  # data offset far past the end
    r.data.flush()
    del r
    with pytest.raises(GGUFFormatError, match="blk.2.ffn_up_exps.weight"):
        GGUFModel(p)


def test_lying_tensor_count_is_fast_and_clean(tiny_path, tmp_path):
    p = _copy(tiny_path, tmp_path)
    r = gguf.GGUFReader(p, "r+")
    r.fields["GGUF.tensor_count"].parts[0][0] = 1 << 60
    r.data.flush()
    del r
    t0 = time.perf_counter()
    with pytest.raises(GGUFFormatError):
        GGUFModel(p)
    assert time.perf_counter() - t0 < 5.0


def test_row_length_not_multiple_of_block(tiny_path, tmp_path):
    p = _copy(tiny_path, tmp_path)
    r, f = _tensor_field(p, "blk.1.ffn_gate_exps.weight")
    f.parts[3][0] = 200  # ne0 of a Q4_K tensor: not a multiple of 256
    r.data.flush()
    del r
    with pytest.raises(QuantShapeError, match=r"blk.1.ffn_gate_exps.weight.*200.*256"):
        GGUFModel(p)


def test_unsupported_expert_quant_type(tmp_path):
    """Expert tensors in a type that is no expert format here (Q4_0) -> UnsupportedQuantError
    naming the tensor; an unknown ggml type id -> UnsupportedQuantError too."""
    cfg = synth.PRESETS["tiny-olmoe"]
    p = str(tmp_path / "q40.gguf")
    synth.write_gguf(cfg, p)
    r, f = _tensor_field(p, "blk.0.ffn_up_exps.weight")
    # Q4_0 blocks are 18 B per 32 vs Q4_K's 144 per 256: same row bytes ratio differs, so also
    # shrink nothing — the type check comes before any byte-range check on the data.
    f.parts[4][0] = int(gguf.GGMLQuantizationType.Q4_0)
    r.data.flush()
    del r
    with pytest.raises(UnsupportedQuantError, match=r"blk.0.ffn_up_exps.weight.*Q4_0"):
        ExpertStore(GGUFModel(p))
    r, f = _tensor_field(p, "blk.0.ffn_up_exps.weight")
    f.parts[4][0] = 250
    r.data.flush()
    del r
    with pytest.raises(UnsupportedQuantError, match=r"blk.0.ffn_up_exps.weight.*250"):
        GGUFModel(p)


def _set_kv(path, key, value):
    r = gguf.GGUFReader(path, "r+")
    r.fields[key].parts[-1][0] = value
    r.data.flush()


def test_inconsistent_expert_counts(tiny_path, tmp_path):
    p = _copy(tiny_path, tmp_path)
    _set_kv(p, "deepseek2.expert_count", 6)
    with pytest.raises(ModelConfigError, match=r"ffn_gate_exps.*expected \(256, 160, 6\)"):
        GGUFModel(p)


def test_model_without_experts(tiny_path, tmp_path):
    p = _copy(tiny_path, tmp_path)
    _set_kv(p, "deepseek2.expert_count", 0)
    with pytest.raises(ModelConfigError, match="no experts"):
        GGUFModel(p)


def test_unsupported_architecture(dense_gguf):
    with pytest.raises(ModelConfigError, match="'gpt2'.*supported MoE architectures"):
        GGUFModel(dense_gguf("gpt2"))


def test_store_index_errors(tiny_path):
    store = ExpertStore(GGUFModel(tiny_path))
    with pytest.raises(ModelConfigError, match="layer 0 has no routed experts"):
        store.expert(0, 0)
    with pytest.raises(ModelConfigError, match="out of range"):
        store.expert(1, 8)


# ---------------------------------------- older files: one tensor per expert (blk.L.ffn_up.E) ----
@pytest.fixture(scope="module")
def split_pair(tmp_path_factory):
    """The same tiny Mixtral written twice: experts merged (ffn_*_exps) and one tensor per expert,
    the layout of Mixtral GGUFs converted before llama.cpp merged them."""
    d = tmp_path_factory.mktemp("split")
    cfg = synth.PRESETS["tiny-mixtral"]
    return (synth.write_gguf(cfg, d / "merged.gguf"),
            synth.write_gguf(dataclasses.replace(cfg, split_experts=True), d / "split.gguf"))


def test_split_expert_layout_reads_like_merged(split_pair):
    merged, split = GGUFModel(split_pair[0]), GGUFModel(split_pair[1])
    assert "blk.0.ffn_gate.7.weight" in split.tensors and not split.has("blk.0.ffn_gate_exps.weight")
    assert dataclasses.replace(split.config) == merged.config
    sm, ss = ExpertStore(merged), ExpertStore(split)
    assert ss.expert_bytes == sm.expert_bytes > 0
    for layer in ss.layers:
        assert ss.layout(layer) == sm.layout(layer)
        for e in range(split.config.n_experts):
            a, b = sm.expert(layer, e), ss.expert(layer, e)
            for which, x, y in zip(("gate", "up", "down"), (a.gate, a.up, a.down), (b.gate, b.up, b.down)):
                assert (x.qtype, x.shape) == (y.qtype, y.shape)
                np.testing.assert_array_equal(x.data, y.data)
                assert np.shares_memory(y.data, split.raw(f"blk.{layer}.ffn_{which}.{e}.weight"))  # zero-copy
    sm.pack(pin=False)
    ss.pack(pin=False)
    for layer in ss.layers:
        np.testing.assert_array_equal(ss.arena_tensor(layer).numpy(), sm.arena_tensor(layer).numpy())


def test_split_expert_missing_or_mixed_types_are_named(split_pair, tmp_path):
    p = _copy(split_pair[1], tmp_path)
    r, f = _tensor_field(p, "blk.1.ffn_up.3.weight")
    name = f.parts[1]
    name[name.tobytes().index(b".3.")+1] = ord("9")  # expert 3 of that matrix is gone
    r.data.flush()
    del r
    with pytest.raises(ModelConfigError, match=r"blk\.1\.ffn_up\.3\.weight.*missing"):
        GGUFModel(p)
    p = _copy(split_pair[1], tmp_path, "mixed.gguf")
    r, f = _tensor_field(p, "blk.2.ffn_gate.5.weight")
    assert int(f.parts[4][0]) == formats.Q4_K
    # one expert of a layer in another type: Q4_0 has Q4_K's 144 bytes per 256 weights, so only
    # the per-layer type check can catch it
    f.parts[4][0] = int(gguf.GGMLQuantizationType.Q4_0)
    r.data.flush()
    del r
    with pytest.raises(ModelConfigError, match=r"blk\.2\.ffn_gate have different types \(Q4_0, Q4_K\)"):
        GGUFModel(p)


# ------------------------------------ counts and offsets checked at open (issue 16) ----------
def test_misaligned_tensor_offset_is_refused(tiny_path, tmp_path):
    """A data offset that is not a multiple of general.alignment (32 here) is refused, naming the
    tensor, the offset and the alignment (llama.cpp refuses it too); the aligned original opens."""
    p = _copy(tiny_path, tmp_path)
    r, f = _tensor_field(p, "blk.1.ffn_down_exps.weight")
    assert int(f.parts[5][0]) % 32 == 0
    f.parts[5][0] = int(f.parts[5][0]) + 16  # still inside the file: only the alignment is wrong
    r.data.flush()
    del r
    with pytest.raises(GGUFFormatError, match=r"'blk.1.ffn_down_exps.weight'.*offset \d+ is not a multiple of "
                                              r"general.alignment \(32\)"):
        GGUFModel(p)
    GGUFModel(tiny_path)


@pytest.mark.parametrize("value", [5, 2**31, 2**32 - 1])
def test_block_count_beyond_the_file_is_refused_before_allocation(tiny_path, tmp_path, value):
    """block_count larger than the blocks the file holds: one error naming the key, the value and
    the blocks found, fast and without allocating by the count (the issue's 2^31 case sized a tuple
    of every layer index before noticing)."""
    import tracemalloc

    p = _copy(tiny_path, tmp_path)
    _set_kv(p, "deepseek2.block_count", value)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelConfigError, match=rf"deepseek2.block_count is {value}, expected 1..4 "
                                                   r"\(the file holds tensors for 4 blocks"):
            GGUFModel(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5.0
    assert peak < 4 * os.path.getsize(p), peak


def test_counts_that_disagree_with_tensors_are_named(tiny_path, tmp_path):
    """Each metadata count a loader sizes things by, set to a value the tensor table contradicts:
    ModelConfigError naming the key or tensor, the expected and the found value."""
    cases = [
        ("deepseek2.block_count", 0, r"block_count is 0, expected 1..4"),
        ("deepseek2.leading_dense_block_count", 4, r"leading_dense_block_count is 4, expected 0..3"),
        ("deepseek2.embedding_length", 4096, r"'token_embd.weight' has dims \(256, \d+\), expected \(4096, vocab\)"),
        ("deepseek2.vocab_size", 1 << 30, r"vocab_size is 1073741824 but token_embd.weight has \d+ rows"),
        ("deepseek2.attention.head_count", 0, r"head_count is 0, expected 1..256"),
        ("deepseek2.attention.head_count", 8, r"'blk.0.attn_q.weight' has dims \(256, 192\), expected \(\*, 384\)"),
        ("deepseek2.attention.head_count_kv", 5, r"head_count_kv is 5, expected 1..4"),
        ("deepseek2.attention.kv_lora_rank", 1 << 31, r"kv_lora_rank is 2147483648, expected 1..1048576"),
        ("deepseek2.rope.dimension_count", 1 << 20, r"rope.dimension_count is 1048576, expected 2..48"),
        ("deepseek2.attention.key_length", 40, r"rope.dimension_count is 16|attn_kv_a_mqa|attn_q.weight' has dims"),
    ]
    for key, value, pattern in cases:
        p = _copy(tiny_path, tmp_path, f"{key}-{value}.gguf")
        _set_kv(p, key, value)
        with pytest.raises(ModelConfigError, match=pattern) as ei:
            GGUFModel(p)
        assert str(p) in str(ei.value)


def test_token_list_longer_than_embedding_is_refused(tmp_path):
    """tokenizer.ggml.tokens with more entries than token_embd.weight has rows (llama.cpp requires
    them equal): named at open, not an index error in the tokenizer or a logits shape later."""
    cfg = synth.PRESETS["tiny-olmoe"]
    p = str(tmp_path / "m.gguf")
    synth.write_gguf(cfg, p)
    r, f = _tensor_field(p, "token_embd.weight")
    n = int(f.parts[3][1])
    f.parts[3][1] = n - 1  # one row fewer (the bytes stay; only the dims lie)
    r.data.flush()
    del r
    with pytest.raises(ModelConfigError, match=rf"olmoe.vocab_size is {n} but token_embd.weight has {n - 1} rows"):
        GGUFModel(p)
    _set_kv(p, "olmoe.vocab_size", n - 1)  # the key agrees with the tensor; the token list still does not
    with pytest.raises(ModelConfigError, match=rf"tokenizer.ggml.tokens holds {n} tokens but token_embd.weight "
                                               rf"has {n - 1} rows"):
        GGUFModel(p)


def test_lying_kv_count_and_array_length_are_refused_by_the_bytes_left(tiny_path, tmp_path):
    """kv_count and an array length far beyond what the file's bytes can hold: refused before the
    reader loops over them, naming the count (and the key for an array)."""
    p = _copy(tiny_path, tmp_path)
    r = gguf.GGUFReader(p, "r+")
    r.fields["GGUF.kv_count"].parts[0][0] = 1 << 40
    r.data.flush()
    del r
    with pytest.raises(GGUFFormatError, match=r"GGUF.kv_count \(metadata keys\) is 1099511627776"):
        GGUFModel(p)
    p = _copy(tiny_path, tmp_path, "arr.gguf")
    r = gguf.GGUFReader(p, "r+")
    f = r.fields["tokenizer.ggml.token_type"]
    f.parts[4][0] = 1 << 33  # parts: key len, key, value type, item type, length, items...
    r.data.flush()
    del r
    t0 = time.perf_counter()
    with pytest.raises(GGUFFormatError, match=r"'tokenizer.ggml.token_type': array length is 8589934592"):
        GGUFModel(p)
    assert time.perf_counter() - t0 < 5.0


# ---------------------------------------- files we write: keys other readers need (issue 16) --
# What llama.cpp's load_hparams (src/llama-model.cpp; deepseek2 in models/deepseek2.cpp) reads
# with get_key(..., required) for each architecture we write, plus the keys every arch needs.
_LLAMA_CPP_COMMON = ("general.architecture", "{a}.context_length", "{a}.embedding_length", "{a}.block_count",
                     "{a}.feed_forward_length", "{a}.attention.head_count", "{a}.attention.head_count_kv",
                     "{a}.attention.layer_norm_rms_epsilon", "{a}.expert_count", "{a}.expert_used_count",
                     "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                     "tokenizer.ggml.eot_token_id")
_LLAMA_CPP_ARCH = {
    # q_lora_rank is optional only when block_count is 26 or 27 (llama.cpp's guess at "lite")
    "deepseek2": ("{a}.leading_dense_block_count", "{a}.attention.q_lora_rank", "{a}.attention.kv_lora_rank",
                  "{a}.expert_feed_forward_length", "{a}.expert_shared_count", "{a}.expert_weights_scale",
                  "{a}.rope.dimension_count", "{a}.attention.key_length", "{a}.attention.value_length"),
    "qwen2moe": ("{a}.expert_feed_forward_length", "{a}.expert_shared_feed_forward_length"),
    "qwen3moe": ("{a}.expert_feed_forward_length",),
    "llama": (),
    "olmoe": (),
}
# End-of-generation token texts llama.cpp recognises (llama-vocab.cpp); an eos outside its set
# loads with "special_eos_id is not in special_eog_ids".
_LLAMA_CPP_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
                        "<|end_of_text|>", "<eos>")


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2moe", "tiny-qwen3moe", "tiny-mixtral", "tiny-olmoe",
                                    "tiny+mla_split"])
def test_written_files_carry_llama_cpp_keys(preset, tmp_path):
    name, _, opt = preset.partition("+")
    cfg = synth.PRESETS[name]
    if opt:
        cfg = dataclasses.replace(cfg, **{opt: True})
    p = synth.write_gguf(cfg, tmp_path / "m.gguf")
    r = gguf.GGUFReader(p)
    a = cfg.arch
    missing = [k.format(a=a) for k in _LLAMA_CPP_COMMON + _LLAMA_CPP_ARCH[a] if k.format(a=a) not in r.fields]
    assert not missing, missing
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        assert tokens[r.fields[key].contents()] in _LLAMA_CPP_EOG_TEXTS, key
    if a == "deepseek2":
        assert r.fields["deepseek2.attention.q_lora_rank"].contents() == 0
        names = [t.name for t in r.tensors]
        if cfg.mla_split:
            # the converter's layout: MQA over the latent, head sizes in the *_mla keys
            f = {k: r.fields[f"deepseek2.{k}"].contents() for k in (
                "attention.head_count_kv", "attention.key_length", "attention.value_length",
                "attention.key_length_mla", "attention.value_length_mla")}
            assert f == {"attention.head_count_kv": 1,
                         "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_dim,
                         "attention.value_length": cfg.kv_lora_rank,
                         "attention.key_length_mla": cfg.qk_nope_dim + cfg.qk_rope_dim,
                         "attention.value_length_mla": cfg.v_head_dim}
            assert not any("attn_kv_b" in n for n in names)
            for i in range(cfg.n_layers):  # k_b right before v_b, where kv_b was
                k = names.index(f"blk.{i}.attn_k_b.weight")
                assert names[k - 1] == f"blk.{i}.attn_kv_a_norm.weight"
                assert names[k + 1] == f"blk.{i}.attn_v_b.weight"
            t = {t.name: t for t in r.tensors}
            # ggml ne order, as llama.cpp's create_tensor asks for them
            assert tuple(t["blk.0.attn_k_b.weight"].shape) == (cfg.qk_nope_dim, cfg.kv_lora_rank, cfg.n_heads)
            assert tuple(t["blk.0.attn_v_b.weight"].shape) == (cfg.kv_lora_rank, cfg.v_head_dim, cfg.n_heads)
        else:
            assert "blk.0.attn_kv_b.weight" in names and "blk.0.attn_k_b.weight" not in names


def test_mla_split_layout_gives_the_same_model(tmp_path):
    """synth's split attn_k_b / attn_v_b file and its attn_kv_b file load into the same model:
    kv_b rebuilt from the split tensors equals the dequantized kv_b bit for bit, so the logits
    are identical (dense='dequant': both run the same float matmuls) and so are greedy tokens."""
    from hybrimoe.models import load_gguf_model

    cfg = synth.PRESETS["tiny"]
    old = synth.write_gguf(cfg, tmp_path / "kv_b.gguf")
    new = synth.write_gguf(dataclasses.replace(cfg, mla_split=True), tmp_path / "split.gguf")
    a, gma, _ = load_gguf_model(old, progress=False, dense="dequant")
    b, gmb, _ = load_gguf_model(new, progress=False, dense="dequant")
    assert gmb.has("blk.0.attn_k_b.weight") and not gmb.has("blk.0.attn_kv_b.weight")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.tensor([[0, 17, 42, 99, 5, 260, 3]])
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb)
    ga = a.generate(ids, max_new_tokens=6, do_sample=False)
    gb = b.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ga, gb)
