"""Fewer torch ops per CPU decode step: native RMSNorm for transformers' RMSNorm modules.

A decode token of a 27-layer DeepSeek-V2-Lite runs 82 RMSNorms; transformers computes each as six
torch ops (to, pow, mean, add, rsqrt, two muls), ~40 us on one core of the 2-core Zen 3 box for a
2048-wide row, where the arithmetic is ~1 us. `use_native_rms_norm(model)` routes the RMSNorm
modules of the families hybrimoe loads (their forwards are the same formula, listed in
RMS_NORM_CLASSES) to `hybrimoe.cpu.rms_norm` for float32 CPU inputs and leaves every other call
(bf16, a GPU tensor, no extension) to the module's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu as _cpu

# transformers classes whose forward is: x.float(); x * rsqrt(mean(x^2) + variance_epsilon); weight * x
RMS_NORM_CLASSES = frozenset({"DeepseekV2RMSNorm", "DeepseekV3RMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm",
                              "MixtralRMSNorm", "OlmoeRMSNorm", "LlamaRMSNorm"})


def _norm_forward(mod: nn.Module, own):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = mod.weight
        if (hidden_states.dtype == torch.float32 and hidden_states.device.type == "cpu" and w.dtype == torch.float32
                and w.device.type == "cpu" and hidden_states.numel() and hidden_states.stride(-1) == 1):
            return _cpu.rms_norm(hidden_states, w, mod.variance_epsilon)
        return own(hidden_states)

    forward.hybrimoe_native = True
    return forward


def use_native_rms_norm(model: nn.Module) -> int:
    """Route the model's RMSNorm modules (RMS_NORM_CLASSES) to the native kernel where it applies.
    Returns how many were switched (0 without the extension). Idempotent."""
    if not _cpu.available():
        return 0
    n = 0
    for mod in model.modules():
        if type(mod).__name__ not in RMS_NORM_CLASSES or getattr(mod.forward, "hybrimoe_native", False):
            continue
        if not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 1:
            continue
        mod.forward = _norm_forward(mod, mod.forward)
        n += 1
    return n
