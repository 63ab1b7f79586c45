"""Trace readers: sane shapes and values from each shared source; our .npz round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybrimoe.traces import DECODE, PREFILL, Trace, TraceFormatError, load_trace, read_routing_counts, save_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
FLAME_DIR = TRACES / "flame-moe-290m_dynande"
MIX_DIR = TRACES / "mixtral8x7b_speculative-moe"
COUNTS = TRACES / "olmoe_mixtral_routing-counts_allenai" / "routing_counts.npz"


def need(p: Path):
    return pytest.mark.skipif(not p.exists(), reason=f"trace not found at {p}")


def check_sane(t: Trace, E: int, k: int, L: int):
    assert t.expert_ids.shape[1:] == (L, k) and t.n_experts == E
    assert t.expert_ids.min() >= 0 and t.expert_ids.max() < E
    # k distinct experts per (token, layer), scores positive and sorted descending (rank order)
    srt = np.sort(t.expert_ids.astype(int), axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all()
    assert (t.scores > 0).all() and (np.diff(t.scores, axis=-1) <= 1e-6).all()


@need(FLAME_DIR / "flame290m_prefill_4x512tok_8layers_top6.npz")
def test_flame_reader():
    t = load_trace(FLAME_DIR / "flame290m_prefill_4x512tok_8layers_top6.npz")
    assert t.n_tokens == 2048 and list(t.moe_layers) == list(range(2, 10))
    check_sane(t, 64, 6, 8)
    assert (t.phase == PREFILL).all() and list(np.unique(t.seq)) == [0, 1, 2, 3]
    # the dataset card's row 0 of layer 2 (SOURCE.md)
    assert t.expert_ids[0, 0].tolist() == [34, 28, 21, 47, 3, 12]
    assert t.scores[0, 0, 0] == pytest.approx(0.0998, abs=1e-4)
    assert (t.scores.sum(-1) < 1).all()  # softmax probs of the chosen 6, not renormalised
    m = t.score_matrix(slice(0, 3), 0)
    assert m.shape == (3, 64) and ((m > 0).sum(1) == 6).all()
    first = load_trace(FLAME_DIR / "flame290m_first10pos_64seqs_8layers_top6.npz")
    assert first.n_tokens == 640
    np.testing.assert_array_equal(first.expert_ids[:10], t.expert_ids[:10])


@need(MIX_DIR / "humaneval_2_routing.jsonl")
def test_mixtral_decode_reader():
    t = load_trace(MIX_DIR / "humaneval_2_routing.jsonl")
    check_sane(t, 8, 2, 32)
    assert (t.phase == DECODE).all()
    n0, n1 = (t.seq == 0).sum(), (t.seq == 1).sum()
    assert 78 <= n0 <= 83 and 250 <= n1 <= 255  # ~82 and ~253 tokens, truncated to complete rows
    np.testing.assert_allclose(t.scores.sum(-1), 1.0, atol=1e-5)  # renormalised top-2


@need(MIX_DIR / "routing_raw_humaneval_p0_prefill_decode.jsonl")
def test_mixtral_prefill_decode_reader():
    t = load_trace(MIX_DIR / "routing_raw_humaneval_p0_prefill_decode.jsonl")
    check_sane(t, 8, 2, 32)
    n_pre = int((t.phase == PREFILL).sum())
    assert 0 < n_pre <= 135 and (t.phase[:n_pre] == PREFILL).all() and (t.phase[n_pre:] == DECODE).all()
    assert t.n_tokens - n_pre > 50


@need(COUNTS)
def test_routing_counts_prior():
    c = read_routing_counts(COUNTS, "mistral", "c4")
    assert c.counts.shape == (3, 8) and c.layers == (0, 7, 15) and (c.counts > 0).all()
    full = c.for_layers(32)
    assert full.shape == (32, 8)
    np.testing.assert_array_equal(full[0], c.counts[0])
    np.testing.assert_array_equal(full[31], c.counts[2])
    assert read_routing_counts(COUNTS, "olmoe", "arxiv").counts.shape == (3, 64)
    with pytest.raises(TraceFormatError, match="no key"):
        read_routing_counts(COUNTS, "mixtral", "c4")


def test_save_load_roundtrip_and_counts(tmp_path, rng):
    n, L, E, k = 7, 3, 16, 4
    ids = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(n)]).astype(np.int16)
    t = Trace(ids, rng.random((n, L, k)).astype(np.float32), np.r_[np.zeros(3), np.ones(4)].astype(np.uint8),
              np.zeros(n, np.int32), np.arange(L, dtype=np.int16), E, "rt", "softmax_topk", "test")
    save_trace(t, tmp_path / "t.npz")
    u = load_trace(tmp_path / "t.npz")
    for f in ("expert_ids", "scores", "phase", "seq", "moe_layers"):
        np.testing.assert_array_equal(getattr(u, f), getattr(t, f))
    assert (u.n_experts, u.name, u.score_kind) == (E, "rt", "softmax_topk")
    c = t.counts()
    assert c.shape == (L, E) and (c.sum(1) == n * k).all()


def test_bad_traces_raise():
    with pytest.raises(TraceFormatError, match="expert id out of range"):
        Trace(np.full((1, 1, 1), 9, np.int16), np.ones((1, 1, 1), np.float32), np.zeros(1, np.uint8),
              np.zeros(1, np.int32), np.zeros(1, np.int16), 8)
    with pytest.raises(TraceFormatError, match="unknown trace type"):
        load_trace("x.csv")
