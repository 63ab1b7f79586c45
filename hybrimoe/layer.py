"""HybridMoELayer: a drop-in MoE block that splits each layer's experts between GPU and CPU.

Each HybridMoELayer holds its router, routing rule and shared expert; the model-wide state and
the per-layer sequence live in hybrimoe.runtime.HybridRuntime (decisions: hybrimoe.step; where
experts run: hybrimoe.executors; prefetch look-ahead: hybrimoe.lookahead; calibration:
hybrimoe.calibration; statistics: hybrimoe.stats):

    x (T, H) -> route -> runtime.moe_begin (decide, loads, CPU job, GPU part, prefetch)
             -> shared expert (overlaps the CPU job) -> runtime.moe_end -> y = routed + shared

RuntimeConfig, HybridRuntime and LayerStats are importable from here as before.
"""

from __future__ import annotations

import torch
from torch import nn

from . import reference
from .errors import ModelConfigError
from .reference import RoutingConfig
from .runtime import ENGINES, GPU_SIDES, HybridRuntime, RuntimeConfig  # noqa: F401 - re-exported
from .stats import LayerStats  # noqa: F401 - re-exported


class HybridMoELayer(nn.Module):
    """Drop-in MoE block. forward(hidden (..., H)) -> (..., H) in hidden's dtype.

    router_weight: (E, H) float; routing: RoutingConfig (top-k, softmax/sigmoid, renormalisation,
    scale); shared: optional module (or callable) for shared experts, added to the output;
    shared_gate: optional (H,) / (1, H) weight of qwen2moe's sigmoid gate on the shared expert.
    """

    def __init__(self, runtime: HybridRuntime, layer: int, router_weight: torch.Tensor, routing: RoutingConfig,
                 shared=None, shared_gate: torch.Tensor | None = None):
        super().__init__()
        if layer not in runtime.index:
            raise ModelConfigError(f"layer {layer} is not a MoE layer of this model ({runtime.moe_layers})")
        self.runtime, self.layer, self.routing = runtime, layer, routing
        self.router_weight = nn.Parameter(router_weight.detach().float(), requires_grad=False)
        self.shared = shared
        self.shared_gate = None if shared_gate is None else nn.Parameter(shared_gate.detach().float().reshape(1, -1),
                                                                         requires_grad=False)
        runtime.register_router(layer, self.router_weight, routing)
        self._shared_blocks = self._fusable_shared(shared)

    def _fusable_shared(self, shared):
        """The shared expert as a CPU-kernel expert (PreparedExpert) when it can join the routed
        experts' CPU job: no CUDA, its three projections kept as GGUF blocks (QuantLinear, no bias,
        expert types) and a SiLU gate. Then one native call computes routed + shared experts: no
        three separate matmul jobs, no pool round trips between them. Else None."""
        from .qlinear import QuantLinear

        rt = self.runtime
        if shared is None or rt.gpu_real or rt.cpu is None:
            return None
        projs = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, QuantLinear) and p.bias is None for p in projs):
            return None
        act = getattr(shared, "act_fn", None)
        if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):  # transformers' own
            return None
        try:
            return rt.cpu.PreparedExpert(*(p.qt for p in projs), name=f"layer {self.layer} shared expert")
        except Exception:  # noqa: BLE001 - a type or shape the fused kernel does not take: run it apart
            return None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        r = None if self.runtime.route_override is None else self.runtime.route_override(self.layer, x)
        ids, w, probs = r if r is not None else reference.route(x, self.router_weight, self.routing)
        gate = None if self.shared_gate is None else torch.sigmoid(x.float() @ self.shared_gate.T)  # (T, 1)
        extra = None
        if self._shared_blocks is not None:  # the shared expert rides in the CPU experts' job
            sw = gate.reshape(-1) if gate is not None else torch.ones(x.shape[0])
            extra = (self._shared_blocks, sw.detach().numpy())
        pend = self.runtime.moe_begin(self.layer, x, ids, w, probs, extra=extra)
        s = None
        if self.shared is not None and extra is None:  # queued while the CPU experts run (CUDA: async)
            s = self.shared(x).float()
            if gate is not None:
                s = s * gate
        y = self.runtime.moe_end(pend)
        if s is not None:
            y = y + s
        return y.to(hidden.dtype).reshape(shape)


def hybrid_factory(runtime: HybridRuntime):
    """moe_factory for hybrimoe.models.load_gguf_model / patch: replaces a transformers MoE block
    (router at `block.gate.weight`, shared expert at `shared_experts` / `shared_expert`, qwen2moe's
    `shared_expert_gate`) by a HybridMoELayer on `runtime`."""

    def make(layer: int, block: nn.Module, gguf_model, store) -> HybridMoELayer:
        shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        gate = getattr(block, "shared_expert_gate", None)
        return HybridMoELayer(runtime, layer, block.gate.weight, RoutingConfig.from_moe_config(runtime.store.config),
                              shared=shared, shared_gate=None if gate is None else gate.weight)

    return make
