"""hybrimoe: run Mixture-of-Experts GGUF models on one GPU plus the host CPU.

Nothing here imports a native module, Triton or CUDA at import time; each is loaded on first use.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401 - re-exported
    GGUFFormatError,
    HybrimoeError,
    KernelInputError,
    ModelConfigError,
    QuantShapeError,
    UnsupportedQuantError,
)

_LAZY = {
    "HybridMoELayer": "layer", "HybridRuntime": "layer", "RuntimeConfig": "layer", "hybrid_factory": "layer",
    "load_gguf_model": "models", "patch": "models", "GGUFModel": "gguf_model", "ExpertStore": "store",
}


def __getattr__(name):
    """Public classes and functions, imported on first use (torch/transformers load lazily)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hybrimoe' has no attribute {name!r}")
