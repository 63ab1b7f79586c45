"""The one readable MoE forward. Every kernel, the HybridMoELayer and the patched models are
tested against it; tests and benchmarks import it, never re-type it.

    probs  = softmax(x @ router.T)        (or sigmoid, as the arch says)
    ids    = top-k of probs per token      (T, k), ranked
    w      = probs[ids], renormalised if the arch says, times routed_scale
    y      = sum_j w[:, j] * expert_{ids[:, j]}(x)  +  shared(x) [* sigmoid(x @ shared_gate)]
    expert(x) = (silu(x @ gate.T) * (x @ up.T)) @ down.T
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    gating: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = False
    routed_scale: float = 1.0

    @classmethod
    def from_moe_config(cls, cfg) -> "RoutingConfig":
        return cls(cfg.top_k, cfg.gating, cfg.norm_topk, cfg.routed_scale)


def route(x: torch.Tensor, router_w: torch.Tensor, rc: RoutingConfig):
    """x: (T, H); router_w: (E, H). Returns (ids (T, k) int64, weights (T, k) float32,
    probs (T, E) float32 — the full routing scores the cache policies observe)."""
    logits = x.float() @ router_w.float().T
    probs = torch.sigmoid(logits) if rc.gating == "sigmoid" else torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, rc.top_k, dim=-1)
    if rc.norm_topk:
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return ids, (w * rc.routed_scale).float(), probs


def expert_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x: (T, H); gate, up: (I, H); down: (H, I). float32 math."""
    x = x.float()
    return (F.silu(x @ gate.float().T) * (x @ up.float().T)) @ down.float().T


def moe_routed(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts) -> torch.Tensor:
    """Sum over each token's routed experts. experts: indexable e -> (gate, up, down) float tensors
    (or a callable e -> tuple). Returns (T, H) float32."""
    T_, H = x.shape
    out = torch.zeros(T_, H, dtype=torch.float32)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        g, u, d = experts(e) if callable(experts) else experts[e]
        out.index_add_(0, tok, weights[tok, slot, None] * expert_ffn(x[tok], g, u, d))
    return out


def moe_forward(x, router_w, experts, rc: RoutingConfig, shared=None, shared_gate=None):
    """Full MoE block: routed experts + optional shared expert (gate, up, down) with optional
    sigmoid gate vector (H,) or (1, H). Returns (y (T, H) float32, ids, weights, probs)."""
    ids, w, probs = route(x, router_w, rc)
    y = moe_routed(x, ids, w, experts)
    if shared is not None:
        s = expert_ffn(x, *shared)
        if shared_gate is not None:
            s = s * torch.sigmoid(x.float() @ shared_gate.float().reshape(-1, 1))
        y = y + s
    return y, ids, w, probs
