"""Exceptions raised for bad input. Each names what was wrong: the file, the tensor or key,
what was expected and what was found."""

from __future__ import annotations


class HybrimoeError(Exception):
    """Base class of every error hybrimoe raises on purpose."""


class GGUFFormatError(HybrimoeError, ValueError):
    """The file is not a readable GGUF: bad magic, truncated, a tensor whose data runs past the end."""


class UnsupportedQuantError(HybrimoeError, ValueError):
    """A tensor has a quantization type this code path cannot handle."""


class QuantShapeError(HybrimoeError, ValueError):
    """A row length is not a multiple of its quant type's block size, or a buffer has the wrong size."""


class ModelConfigError(HybrimoeError, ValueError):
    """Metadata is missing or inconsistent: no experts, expert counts that disagree, unknown arch."""


class KernelInputError(HybrimoeError, ValueError):
    """A kernel was given tensors of the wrong shape, dtype or layout (raised before any work)."""


def _fmt(where: str | None, what: str, expected=None, found=None) -> str:
    msg = f"{where}: {what}" if where else what
    if expected is not None or found is not None:
        msg += f" (expected {expected}, found {found})"
    return msg
