"""hybrimoe: run Mixture-of-Experts GGUF models on one GPU plus the host CPU.

Nothing here imports a native module, Triton or CUDA at import time; each is loaded on first use.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    GGUFFormatError,
    HybrimoeError,
    KernelInputError,
    ModelConfigError,
    QuantShapeError,
    UnsupportedQuantError,
)
