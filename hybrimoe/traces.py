"""Routing traces: which experts each token chose, per MoE layer, in rank order.

One format for every source, numpy only, saved as .npz:

    expert_ids  int16   (N, L, k)  ids of the k chosen experts, highest router score first
    scores      float32 (N, L, k)  router score of each chosen expert (see `score_kind`)
    phase       uint8   (N,)       0 = prefill token, 1 = decode token
    seq         int32   (N,)       sequence (prompt) id; tokens of one sequence are contiguous
    moe_layers  int16   (L,)       model layer index of each traced MoE layer
    meta        json string        name, n_experts, score_kind, source

N = tokens in time order (one row = one token through all L layers). Scores are what the source
logged: `softmax_topk` = the router softmax probability of each chosen expert (not renormalised;
FLAME), `renorm_topk` = the top-k weights renormalised to sum to 1 (vLLM topk_weights; Mixtral).
Neither source logged the full (E,) score vector, so `Trace.score_matrix` fills the unchosen
experts with 0: an MRS cache fed from a trace sees only the top-k, not the top-p = 2k the paper
uses (one reason our MRS numbers differ from the paper's).

Counts-only data (OLMoE/Mixtral routing counts) has no token order; `read_routing_counts` returns
a `CountsPrior` usable as `static` cache prior or MRS/LFU warm start, never as a trace.

Readers never copy the source data anywhere; they take a path (the shared traces live in
../shared/traces, outside the project, and the Mixtral files must not be redistributed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import HybrimoeError

PREFILL, DECODE = 0, 1


class TraceFormatError(HybrimoeError, ValueError):
    """A trace file is missing a field or has inconsistent shapes."""


@dataclass(frozen=True)
class Trace:
    expert_ids: np.ndarray  # int16 (N, L, k)
    scores: np.ndarray  # float32 (N, L, k)
    phase: np.ndarray  # uint8 (N,)
    seq: np.ndarray  # int32 (N,)
    moe_layers: np.ndarray  # int16 (L,)
    n_experts: int
    name: str = ""
    score_kind: str = "softmax_topk"
    source: str = ""

    def __post_init__(self):
        n, L, k = self.expert_ids.shape
        for nm, a, shp in (("scores", self.scores, (n, L, k)), ("phase", self.phase, (n,)),
                           ("seq", self.seq, (n,)), ("moe_layers", self.moe_layers, (L,))):
            if a.shape != shp:
                raise TraceFormatError(f"trace {self.name!r}: {nm} shape (expected {shp}, found {a.shape})")
        if n and (self.expert_ids.min() < 0 or self.expert_ids.max() >= self.n_experts):
            raise TraceFormatError(
                f"trace {self.name!r}: expert id out of range (expected 0..{self.n_experts - 1}, "
                f"found {self.expert_ids.min()}..{self.expert_ids.max()})")

    @property
    def n_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def n_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def subset(self, tokens: slice | np.ndarray) -> "Trace":
        """Rows `tokens` (a slice or index array) as a new trace."""
        return Trace(self.expert_ids[tokens], self.scores[tokens], self.phase[tokens], self.seq[tokens],
                     self.moe_layers, self.n_experts, self.name, self.score_kind, self.source)

    def score_matrix(self, tokens: slice | np.ndarray, layer: int) -> np.ndarray:
        """(T, E) float32 router scores of tokens at trace layer `layer`; unchosen experts are 0."""
        ids = self.expert_ids[tokens, layer].reshape(-1, self.top_k).astype(np.int64)
        sc = self.scores[tokens, layer].reshape(-1, self.top_k)
        out = np.zeros((ids.shape[0], self.n_experts), np.float32)
        np.put_along_axis(out, ids, sc, axis=1)
        return out

    def counts(self, tokens: slice | np.ndarray = slice(None)) -> np.ndarray:
        """(L, E) int64 number of tokens that routed to each expert, per layer."""
        ids = self.expert_ids[tokens]
        out = np.zeros((self.n_layers, self.n_experts), np.int64)
        for layer in range(self.n_layers):
            out[layer] = np.bincount(ids[:, layer].ravel(), minlength=self.n_experts)
        return out


@dataclass(frozen=True)
class CountsPrior:
    """Per-expert routing counts for some layers (no token order). counts: (len(layers), E) int64."""

    counts: np.ndarray
    layers: tuple[int, ...]
    name: str = ""
    meta: dict = field(default_factory=dict)

    def for_layers(self, n_layers: int) -> np.ndarray:
        """(n_layers, E) counts: each layer takes the counts of the nearest recorded layer."""
        recorded = np.asarray(self.layers)
        idx = [int(np.argmin(np.abs(recorded - layer))) for layer in range(n_layers)]
        return self.counts[idx]


# ---------------------------------------------------------------------------------------- io
def save_trace(trace: Trace, path: str | Path) -> None:
    """Write `trace` as a compressed .npz (the format in the module docstring)."""
    meta = {"name": trace.name, "n_experts": int(trace.n_experts), "score_kind": trace.score_kind,
            "source": trace.source}
    np.savez_compressed(path, expert_ids=trace.expert_ids.astype(np.int16),
                        scores=trace.scores.astype(np.float32), phase=trace.phase.astype(np.uint8),
                        seq=trace.seq.astype(np.int32), moe_layers=trace.moe_layers.astype(np.int16),
                        meta=np.array(json.dumps(meta)))


def load_trace(path: str | Path, **kw) -> Trace:
    """Read a trace from our .npz, a FLAME .npz or a Mixtral routing .jsonl (chosen by content)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_mixtral_jsonl(path, **kw)
    if path.suffix != ".npz":
        raise TraceFormatError(f"{path}: unknown trace type (expected .npz or .jsonl, found {path.suffix!r})")
    with np.load(path) as z:
        keys = set(z.keys())
        if {"expert_ids", "gate_scores"} <= keys:
            return read_flame(path, **kw)
        if {"expert_ids", "scores", "phase", "seq", "moe_layers", "meta"} <= keys:
            meta = json.loads(str(z["meta"]))
            return Trace(z["expert_ids"], z["scores"], z["phase"], z["seq"], z["moe_layers"],
                         int(meta["n_experts"]), meta.get("name", path.stem), meta.get("score_kind", ""),
                         meta.get("source", str(path)))
    raise TraceFormatError(f"{path}: npz keys {sorted(keys)} match no known trace layout "
                           "(expected ours, or FLAME expert_ids + gate_scores)")


def read_flame(path: str | Path, n_experts: int = 64) -> Trace:
    """FLAME-MoE-290M npz: expert_ids/gate_scores (S, P, 8, 6) -> N = S*P tokens, sequences in order.

    The files are teacher-forced pretraining text, so every token is marked PREFILL even though the
    simulator may replay them one token at a time as a decode stream.
    """
    path = Path(path)
    with np.load(path) as z:
        ids, sc = z["expert_ids"], z["gate_scores"]
        layers = z["moe_layers"] if "moe_layers" in z else np.arange(2, 2 + ids.shape[2])
    if ids.ndim != 4 or sc.shape != ids.shape:
        raise TraceFormatError(f"{path}: expert_ids/gate_scores (expected equal 4-D shapes (S, P, L, k), "
                               f"found {ids.shape} and {sc.shape})")
    s, p, L, k = ids.shape
    return Trace(ids.reshape(s * p, L, k).astype(np.int16), sc.reshape(s * p, L, k).astype(np.float32),
                 np.full(s * p, PREFILL, np.uint8), np.repeat(np.arange(s, dtype=np.int32), p),
                 np.asarray(layers, np.int16), n_experts, path.stem, "softmax_topk", str(path))


def read_mixtral_jsonl(path: str | Path, n_experts: int = 8, problems=None) -> Trace:
    """Mixtral speculative-moe routing .jsonl -> one trace, problems in id order, each truncated to
    the tokens every layer logged.

    Two layouts: `token_idx` (decode tokens only) and `token_pos` (one prompt: prefill rows with
    increasing positions, then decode rows all with position 0, in time order per layer).
    """
    path = Path(path)
    rows: dict[tuple[int, int], list] = {}
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            rows.setdefault((int(r["problem_id"]), int(r["layer"])), []).append(r)
    if not rows:
        raise TraceFormatError(f"{path}: no routing rows")
    n_layers = max(layer for _, layer in rows) + 1
    pids = sorted({p for p, _ in rows} if problems is None else problems)
    parts = []
    for pid in pids:
        per_layer = [rows.get((pid, layer), []) for layer in range(n_layers)]
        if any(not rs for rs in per_layer):
            raise TraceFormatError(f"{path}: problem {pid} lacks some of layers 0..{n_layers - 1}")
        if "token_idx" in per_layer[0][0]:
            maps = [{int(r["token_idx"]): r for r in rs} for rs in per_layer]
            t = 0
            while all(t in m for m in maps):
                t += 1
            seqs = [[m[i] for i in range(t)] for m in maps]
            phase = np.full(t, DECODE, np.uint8)
        else:  # token_pos: prefill rows (positions rise, some lost) until the first position-0 row
            pre, dec = [], []
            for rs in per_layer:
                n_pre = 1
                while n_pre < len(rs) and int(rs[n_pre]["token_pos"]) != 0:
                    n_pre += 1
                pre.append({int(r["token_pos"]): r for r in rs[:n_pre]})
                dec.append(rs[n_pre:])
            # prefill: the positions every layer logged; decode rows carry no index, so lost rows
            # cannot be realigned: truncate each layer to the shortest (misaligns a few tokens)
            keep = sorted(set.intersection(*(set(m) for m in pre)))
            n_dec = min(len(x) for x in dec)
            seqs = [[m[i] for i in keep] + d[:n_dec] for m, d in zip(pre, dec)]
            phase = np.r_[np.full(len(keep), PREFILL, np.uint8), np.full(n_dec, DECODE, np.uint8)]
            t = len(keep) + n_dec
        ids = np.array([[r["experts"] for r in s] for s in seqs], np.int16).transpose(1, 0, 2)
        sc = np.array([[r["gating_probs"] for r in s] for s in seqs], np.float32).transpose(1, 0, 2)
        parts.append((ids, sc, phase, np.full(t, pid, np.int32)))
    ids, sc, ph, sq = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return Trace(ids, sc, ph, sq, np.arange(n_layers, dtype=np.int16), n_experts, path.stem,
                 "renorm_topk", str(path))


def read_routing_counts(path: str | Path, model: str = "mistral", domain: str = "c4",
                        kind: str = "expert_counts") -> CountsPrior:
    """OLMoE routing-counts npz: `<model>__<kind>__<domain>` -> CountsPrior for layers (0, 7, 15)."""
    key = f"{model}__{kind}__{domain}"
    with np.load(path) as z:
        if key not in z:
            raise TraceFormatError(f"{path}: no key {key!r} (found e.g. {sorted(z.keys())[:4]})")
        c = np.asarray(z[key], np.int64)
    if c.ndim != 2:
        raise TraceFormatError(f"{path}: {key} (expected 2-D (layers, E) counts, found shape {c.shape}); "
                               "crosslayer keys are pair counts, not priors")
    return CountsPrior(c, (0, 7, 15), key, {"path": str(path)})
