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


def replay_trace(rt, store, tr, hidden: int, seed: int = 0):
    """Drive `rt` with a trace's routing: one token per step, every MoE layer in order, a fresh
    random hidden state each call. Yields (layer, x, ids, w, y) after each layer call."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for t in range(tr.n_tokens):
        if t:
            rt.next_step()
        for j, layer in enumerate(store.layers):
            x = torch.randn(1, hidden, generator=g)
            ids = torch.from_numpy(tr.expert_ids[t, j].astype(np.int64))[None]
            w = torch.from_numpy(tr.scores[t, j].copy())[None]
            yield layer, x, ids, w, rt.moe(layer, x, ids, w, torch.from_numpy(tr.score_matrix(slice(t, t + 1), j)))
