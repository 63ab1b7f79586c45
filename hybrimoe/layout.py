"""Byte layout of one routed expert when its three matrices travel together.

One expert = [gate blocks | up blocks | down blocks], each part starting at a multiple of
ALIGN bytes. The same layout is used by the pinned host arena, the GPU slot arena (one slot =
one expert) and every kernel that reads a slot, so a slot is addressed by a single base offset.

    gate: (inter, hidden) quantized rows of `hidden` weights   y_g = x @ gate.T
    up:   (inter, hidden)                                       y_u = x @ up.T
    down: (hidden, inter) quantized rows of `inter` weights     y   = (silu(y_g) * y_u) @ down.T
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .formats import qtype_name, row_bytes

ALIGN = 256  # bytes; keeps every matrix 256-byte aligned for vector loads and DMA


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ExpertLayout:
    hidden: int
    inter: int
    gate_type: int
    up_type: int
    down_type: int
    pad_to: int = 0  # minimum slot size: a byte budget shared by layers uses one slot size for all

    @cached_property
    def gate_bytes(self) -> int:
        return self.inter * row_bytes(self.gate_type, self.hidden, "ffn_gate")

    @cached_property
    def up_bytes(self) -> int:
        return self.inter * row_bytes(self.up_type, self.hidden, "ffn_up")

    @cached_property
    def down_bytes(self) -> int:
        return self.hidden * row_bytes(self.down_type, self.inter, "ffn_down")

    @cached_property
    def gate_offset(self) -> int:
        return 0

    @cached_property
    def up_offset(self) -> int:
        return _align(self.gate_bytes)

    @cached_property
    def down_offset(self) -> int:
        return self.up_offset + _align(self.up_bytes)

    @cached_property
    def nbytes(self) -> int:
        """Bytes of one expert slot (gate, up, down, each aligned; at least pad_to)."""
        return max(self.down_offset + _align(self.down_bytes), _align(self.pad_to))

    @cached_property
    def weight_bytes(self) -> int:
        """Bytes of quantized weights proper (what a kernel must read), without padding."""
        return self.gate_bytes + self.up_bytes + self.down_bytes

    def describe(self) -> str:
        return (
            f"expert {self.hidden}->{self.inter}->{self.hidden}: gate {qtype_name(self.gate_type)}, "
            f"up {qtype_name(self.up_type)}, down {qtype_name(self.down_type)}, {self.nbytes} B/slot"
        )
