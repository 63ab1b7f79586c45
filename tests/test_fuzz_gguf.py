"""Seeded, structure-aware fuzzing of a valid tiny GGUF (issue 16).

The mutator knows where every header field lies (counts, key lengths, value types, scalar values,
string and array lengths, each tensor's n_dims, dims, type and data offset) and sets it to the
values that break readers: 0, 1, off by one, doubled, 2^31, 2^32 - 1, 2^63, all ones; it also
truncates the file and flips bytes in the header and in the tensor data. Each mutated file goes
through what `generate` does before decoding (GGUFModel, ExpertStore, the transformers config, the
tokenizer) and, for the first few files that pass, a full load and one forward step.

Contract per file: either a HybrimoeError (the project's clean one-line error) or a clean run;
no other exception type, no case slower than CASE_TIMEOUT_S (a hang would be caught by the alarm),
and Python/numpy allocation (tracemalloc peak; the file itself is memory-mapped, not counted)
within ALLOC_FACTOR x the file size.
"""

from __future__ import annotations

import os
import signal
import time
import tracemalloc

import gguf
import numpy as np
import pytest

from hybrimoe import synth
from hybrimoe.errors import HybrimoeError

SEED = 16
CASE_TIMEOUT_S = 10  # one open takes ~0.1 s here (2-core Zen 3); a full load + forward ~1-3 s
# Measured on the valid file: open + store + config + tokenizer peak ~1.1 MB of a 3.4 MB file;
# a full load + one forward step ~ 1.3x the file (float32 dense weights). 4x leaves room for
# honest overheads and fails for any allocation sized by a lying count.
ALLOC_FACTOR = 4


def _u(n: int, nbytes: int) -> bytes:
    return (int(n) & ((1 << (8 * nbytes)) - 1)).to_bytes(nbytes, "little")


def header_sites(path: str) -> tuple[list[tuple[int, int, str, int]], int]:
    """(sites, data_offset): every integer field of the header as (byte offset, width, label,
    current value), found through gguf's reader (its parts are views into the file map)."""
    r = gguf.GGUFReader(path, "r")
    base = r.data.ctypes.data
    sites = []

    def add(part, label):
        a = np.asarray(part)
        if a.size == 1 and a.dtype.kind in "iu":
            sites.append((a.ctypes.data - base, a.dtype.itemsize, label, int(a[0])))

    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            add(f.parts[0], name)
            continue
        add(f.parts[0], f"{name}: key length")
        add(f.parts[2], f"{name}: value type")
        vt = f.types[0] if f.types else None
        if vt == gguf.GGUFValueType.ARRAY:
            add(f.parts[3], f"{name}: item type")
            add(f.parts[4], f"{name}: array length")
            if f.data:  # first two items (string lengths, or values)
                for k, idx in enumerate(f.data[:2]):
                    j = idx - 1 if f.types[-1] == gguf.GGUFValueType.STRING else idx
                    add(f.parts[j], f"{name}[{k}]")
        elif vt == gguf.GGUFValueType.STRING:
            add(f.parts[3], f"{name}: string length")
        else:
            add(f.parts[-1], f"{name}: value")
    for t in r.tensors:
        p = t.field.parts
        add(p[0], f"{t.name}: name length")
        add(p[2], f"{t.name}: n_dims")
        base_dims = np.asarray(p[3])
        for k in range(base_dims.size):
            add(base_dims[k:k + 1], f"{t.name}: dim {k}")
        add(p[4], f"{t.name}: type")
        add(p[5], f"{t.name}: offset")
    return sites, int(r.data_offset)


def mutations(data: bytes, sites, data_offset: int, n: int, seed: int):
    """n (label, mutated bytes) pairs, drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    size = len(data)
    for _ in range(n):
        kind = rng.choice(["int", "int", "int", "int", "truncate", "flip-header", "flip-data"])
        b = bytearray(data)
        if kind == "truncate":
            cut = int(rng.integers(0, data_offset + 64)) if rng.random() < 0.6 else int(rng.integers(0, size))
            yield f"truncate at {cut}", bytes(b[:cut])
        elif kind == "flip-header":
            at = int(rng.integers(0, data_offset))
            b[at] ^= int(rng.integers(1, 256))
            yield f"flip header byte {at}", bytes(b)
        elif kind == "flip-data":
            at = int(rng.integers(data_offset, size))
            b[at] ^= int(rng.integers(1, 256))
            yield f"flip data byte {at}", bytes(b)
        else:
            off, w, label, v = sites[int(rng.integers(len(sites)))]
            cand = [0, 1, v - 1, v + 1, 2 * v, v + 16, 2**31, 2**32 - 1, 2**63, 2**64 - 1,
                    int(rng.integers(0, 2**31))]
            new = cand[int(rng.integers(len(cand)))]
            b[off:off + w] = _u(new, w)
            yield f"{label}: {v} -> {new & ((1 << (8 * w)) - 1)}", bytes(b)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_case(path: str, full: bool) -> str:
    """What `generate` does with a file up to decoding (and, if `full`, a load and one forward
    step). Returns 'ok' or the HybrimoeError's class name; any other exception propagates."""
    from hybrimoe.gguf_model import GGUFModel
    from hybrimoe.models import hf_config_from_gguf
    from hybrimoe.store import ExpertStore
    from hybrimoe.tokenizer import load_tokenizer

    try:
        m = GGUFModel(path)
        ExpertStore(m)
        hf_config_from_gguf(m)
        tok = load_tokenizer(m)
        tok("the quick brown fox")
        if full:
            import torch

            from hybrimoe.models import load_gguf_model

            model, _, _ = load_gguf_model(m, progress=False)
            with torch.no_grad():
                model(torch.tensor([[0, 5, 6]]))
    except HybrimoeError as e:
        msg = str(e)
        assert "\n" not in msg.strip(), f"multi-line error: {msg!r}"
        return type(e).__name__
    return "ok"


def fuzz(tmp_path, n: int, seed: int, n_full: int) -> dict:
    src = synth.write_gguf(synth.PRESETS["tiny"], tmp_path / "base.gguf")
    data = open(src, "rb").read()
    sites, data_offset = header_sites(src)
    assert run_case(src, full=True) == "ok"  # the base file itself is clean
    outcomes: dict[str, int] = {}
    full_left = n_full
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i, (label, blob) in enumerate(mutations(data, sites, data_offset, n, seed)):
            p = str(tmp_path / f"case{i}.gguf")
            with open(p, "wb") as fh:
                fh.write(blob)
            tracemalloc.start()
            signal.alarm(CASE_TIMEOUT_S)
            t0 = time.perf_counter()
            try:
                res = run_case(p, full=full_left > 0 and blob != data)
            except _Timeout:
                pytest.fail(f"case {i} ({label}): no result within {CASE_TIMEOUT_S} s")
            except Exception as e:  # noqa: BLE001 - the point: nothing but HybrimoeError
                pytest.fail(f"case {i} ({label}): {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            dt = time.perf_counter() - t0
            assert peak <= ALLOC_FACTOR * len(data), (
                f"case {i} ({label}): allocated {peak / 1e6:.1f} MB for a {len(data) / 1e6:.1f} MB file")
            if res == "ok" and full_left > 0:
                full_left -= 1
            outcomes[res] = outcomes.get(res, 0) + 1
            os.unlink(p)
            assert dt < CASE_TIMEOUT_S
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz seed {seed}: {n} cases -> {outcomes}")
    return outcomes


def test_fuzz_gguf_header_and_data(tmp_path):
    """200 seeded mutations (~30 s of CPU on the 2-core box; tracemalloc triples an open's cost);
    most are refused, some run (benign damage: a flipped weight byte, a token id within range);
    every refusal is a one-line HybrimoeError. The slow variant runs 3 x 1000 more."""
    out = fuzz(tmp_path, n=200, seed=SEED, n_full=1)
    assert sum(out.values()) == 200
    assert out.get("ok", 0) > 0 and sum(v for k, v in out.items() if k != "ok") > 100, out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fuzz_gguf_more_seeds(tmp_path, seed):
    out = fuzz(tmp_path, n=1000, seed=seed, n_full=20)
    assert sum(out.values()) == 1000


def test_fuzz_mutator_hits_every_field_kind(tmp_path):
    """The mutator can fail: its sites cover counts, key and string lengths, value types, array
    lengths, tensor dims, types and offsets (a mutator that touched nothing would pass anything)."""
    src = synth.write_gguf(synth.PRESETS["tiny-olmoe"], tmp_path / "b.gguf")
    sites, data_offset = header_sites(src)
    labels = " ".join(s[2] for s in sites)
    for part in ("GGUF.tensor_count", "GGUF.kv_count", "key length", "value type", "array length",
                 "string length", "n_dims", "dim 1", ": type", ": offset", "olmoe.block_count: value"):
        assert part in labels, part
    data = open(src, "rb").read()
    changed = sum(blob != data for _, blob in mutations(data, sites, data_offset, 50, 0))
    assert changed >= 45
