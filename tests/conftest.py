"""Shared test fixtures (kept small and generic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# CI clones the repository next to shared/, so shared/ is two levels above this file.
GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"
GOLDEN_QUANT = GOLDEN_DIR / "llamacpp_quant_vectors.npz"


@pytest.fixture(scope="session")
def golden():
    """llama.cpp's reference quantizer vectors: keys '<TYPE>/<case>/{x,q,deq}' (see its README)."""
    if not GOLDEN_QUANT.is_file():
        pytest.skip(f"golden vectors not found at {GOLDEN_QUANT} (shared/ is not next to the repo)")
    with np.load(GOLDEN_QUANT) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def rng(request):
    """A fresh, unseeded generator; its seed is printed so a failure can be reproduced."""
    seed = int(np.random.SeedSequence().entropy % (2**63))
    print(f"[{request.node.name}] rng seed = {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def dense_gguf(tmp_path):
    """dense_gguf(arch) -> path of a minimal valid GGUF with no experts (one embedding tensor)."""
    import gguf

    def make(arch: str) -> str:
        p = str(tmp_path / f"dense-{arch}.gguf")
        w = gguf.GGUFWriter(p, arch)
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return p

    return make


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUFModel, packed ExpertStore) of the embedded tiny synthetic model, written as a GGUF."""
    from hybrimoe import synth
    from hybrimoe.gguf_model import GGUFModel
    from hybrimoe.store import ExpertStore

    path = synth.write_gguf(synth.PRESETS["tiny"], tmp_path_factory.mktemp("m") / "tiny.gguf")
    m = GGUFModel(path)
    store = ExpertStore(m)
    store.pack(pin=False)
    return m, store


def replay_trace(rt, store, tr, hidden: int, seed: int = 0, chunk: int = 1):
    """Drive `rt` with a trace's routing in the simulator's steps (hybrimoe.sim._steps): decode
    tokens one per step, prefill tokens in chunks of `chunk` (one call of T tokens), every MoE
    layer in order, a fresh random hidden state each call. A prefill after decode or of a new
    sequence starts with rt.new_sequence() (a new prompt), a decode step with rt.next_step(), as
    generate does (and as the simulator opens and closes a prompt's profile). Yields
    (layer, x, ids, w, y) after each layer call."""
    import torch

    from hybrimoe.sim import _steps
    from hybrimoe.traces import PREFILL

    g = torch.Generator().manual_seed(seed)
    prev = None
    for n, step in enumerate(_steps(tr, chunk, np.arange(tr.n_tokens))):
        ph, sq = int(tr.phase[step[0]]), int(tr.seq[step[0]])
        if ph == PREFILL and prev != (PREFILL, sq):
            rt.new_sequence()
        elif ph != PREFILL and n:
            rt.next_step()
        prev = (ph, sq)
        for j, layer in enumerate(store.layers):
            x = torch.randn(len(step), hidden, generator=g)
            ids = torch.from_numpy(tr.expert_ids[step, j].astype(np.int64))
            w = torch.from_numpy(tr.scores[step, j].copy())
            yield layer, x, ids, w, rt.moe(layer, x, ids, w, torch.from_numpy(tr.score_matrix(step, j)))
