"""A transformers tokenizer from a GGUF file's metadata, or from a tokenizer directory.

    tokenizer.ggml.model  what we build
    gpt2                  byte-level BPE (tokens + merges) with the `tokenizers` library; the split
                          regex follows tokenizer.ggml.pre (llama.cpp's names, table _PRE_REGEX)
    llama                 SentencePiece-style BPE through transformers' own GGUF converter
    anything else         ModelConfigError: pass tokenizer_dir (a local Hugging Face tokenizer)

bos/eos/unk/pad come from tokenizer.ggml.*_token_id, the chat template from
tokenizer.chat_template, and tokenizer.ggml.add_bos_token / add_eos_token become the
post-processor (llama.cpp's defaults: add BOS unless the file says not to, no EOS).
"""

from __future__ import annotations

import os

from .errors import ModelConfigError

# llama.cpp pre-tokenizer name -> split regex (src/llama-vocab.cpp). GPT-2's own regex is what
# tokenizers' ByteLevel(use_regex=True) applies, so those names need no Split step.
_GPT2_NAMES = ("default", "gpt2", "gpt-2", "olmo", "starcoder", "refact", "jais", "")
_PRE_REGEX = {  # noqa: E501 (regexes kept on one line, as llama.cpp writes them)
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # noqa: E501
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # noqa: E501
}
# Pre-tokenizers that llama.cpp runs as several regexes in turn, each splitting the pieces the
# previous one left (DeepSeek-V2's GGUFs say "deepseek-llm"; llama-vocab.cpp lists the same).
# Code points with a singleton canonical decomposition (U+1F7D, U+1FBE, U+1FD3, U+1FDB, U+2126,
# U+212A) are written as \x{...}: editors and tools NFC-normalise them into other characters,
# which would silently turn ranges around.
_PRE_REGEX_SEQ = {
    "deepseek-llm": (
        r"[\r\n]",
        r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",  # noqa: E501
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
        r"\s+$",
        r"[一-龥ࠀ-一가-퟿]+",
        r"\p{N}+",
    ),
}


def _get(meta, key, typ=None, default=None):
    return meta.get(key, typ, default)


def _bpe_tokenizer(meta, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = _get(meta, "tokenizer.ggml.merges", None, None)
    if not merges:
        raise ModelConfigError(f"{getattr(meta, 'path', 'GGUF')}: tokenizer.ggml.merges is missing for a "
                               "byte-level BPE ('gpt2') tokenizer")
    pre = _get(meta, "tokenizer.ggml.pre", str, "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=False))
    if pre in _GPT2_NAMES:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _PRE_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _PRE_REGEX_SEQ:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in _PRE_REGEX_SEQ[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ModelConfigError(f"{getattr(meta, 'path', 'GGUF')}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
                               f"supported (known: {', '.join(sorted(set(_GPT2_NAMES) - {''} | set(_PRE_REGEX) | set(_PRE_REGEX_SEQ)))}); "
                               "pass tokenizer_dir= a local copy of the model's Hugging Face tokenizer")
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer(meta, tokens: list[str]):
    """SentencePiece-style ('llama') vocabularies through transformers' GGUF converter."""
    try:
        from transformers.integrations.ggml import GGUFLlamaConverter
    except ImportError:  # moved or removed in this transformers release
        raise ModelConfigError(f"{getattr(meta, 'path', 'GGUF')}: this transformers release has no GGUF "
                               "SentencePiece converter; pass tokenizer_dir= (--tokenizer DIR) a local copy of "
                               "the model's Hugging Face tokenizer") from None

    d = {"tokenizer_type": "llama", "tokens": tokens}
    for key, field in (("tokenizer.ggml.scores", "scores"), ("tokenizer.ggml.token_type", "token_type"),
                       ("tokenizer.ggml.merges", "merges"), ("tokenizer.ggml.bos_token_id", "bos_token_id"),
                       ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                       ("tokenizer.ggml.unknown_token_id", "unk_token_id"),
                       ("tokenizer.ggml.add_space_prefix", "add_prefix_space")):
        v = _get(meta, key)
        if v is not None:
            d[field] = v
    if "scores" not in d and "merges" not in d:
        raise ModelConfigError(f"{getattr(meta, 'path', 'GGUF')}: a 'llama' tokenizer needs tokenizer.ggml.scores "
                               "or tokenizer.ggml.merges")
    return GGUFLlamaConverter(d).converted()


def load_tokenizer(gguf_model, tokenizer_dir: str | os.PathLike | None = None):
    """A transformers PreTrainedTokenizerFast for the model.

    tokenizer_dir: a local Hugging Face tokenizer directory; when given it is used as is
    (AutoTokenizer.from_pretrained(dir, local_files_only=True)). Otherwise the tokenizer is built
    from the GGUF metadata (gguf_model: a GGUFModel, or any object with .get(key, typ, default)).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import processors

    if tokenizer_dir is not None:
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir), local_files_only=True)
    where = getattr(gguf_model, "path", "GGUF")
    kind = _get(gguf_model, "tokenizer.ggml.model", str, None)
    tokens = _get(gguf_model, "tokenizer.ggml.tokens", None, None)
    hint = "pass tokenizer_dir= a local directory holding the model's Hugging Face tokenizer files"
    if kind is None or not tokens:
        raise ModelConfigError(f"{where}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokens); {hint}")
    tokens = [str(t) for t in tokens]
    if kind not in ("gpt2", "llama"):
        raise ModelConfigError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama); {hint}")
    try:
        tok = _bpe_tokenizer(gguf_model, tokens) if kind == "gpt2" else _spm_tokenizer(gguf_model, tokens)
    except ModelConfigError:
        raise
    except Exception as e:  # the tokenizers library raises plain Exception for a bad vocab or merge
        raise ModelConfigError(f"{where}: the tokenizer in the GGUF metadata cannot be built "
                               f"({type(e).__name__}: {e}); {hint}") from None

    def special(key):
        i = _get(gguf_model, key, int, None)
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise ModelConfigError(f"{where}: {key} = {i} is outside the vocabulary (0..{len(tokens) - 1})")
        return tokens[i]

    bos, eos = special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id")
    unk, pad = special("tokenizer.ggml.unknown_token_id"), special("tokenizer.ggml.padding_token_id")
    ttypes = _get(gguf_model, "tokenizer.ggml.token_type", None, None) or []
    if len(ttypes) > len(tokens):
        raise ModelConfigError(f"{where}: tokenizer.ggml.token_type has {len(ttypes)} entries, expected at most "
                               f"{len(tokens)} (one per token)")
    from tokenizers import AddedToken

    # control tokens (type 3) must never be split or merged by BPE
    specials = [tokens[i] for i, t in enumerate(ttypes) if int(t) == 3]
    for s in (bos, eos, unk, pad):
        if s is not None and s not in specials:
            specials.append(s)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    add_bos = bool(_get(gguf_model, "tokenizer.ggml.add_bos_token", bool, True)) and bos is not None
    add_eos = bool(_get(gguf_model, "tokenizer.ggml.add_eos_token", bool, False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        sp = [(s, tokens.index(s)) for s in ((bos,) if add_bos else ()) + ((eos,) if add_eos else ())]
        existing = tok.post_processor
        tp = processors.TemplateProcessing(single=single, pair=pair, special_tokens=sp)
        tok.post_processor = processors.Sequence([existing, tp]) if existing is not None else tp
    kw = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
          if v is not None}
    template = _get(gguf_model, "tokenizer.chat_template", str, None)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kw)
    return out
