"""ExpertStore: the routed experts of a GGUF model as raw quantized blocks in host memory.

For every MoE layer the GGUF holds three 3-D tensors, `ffn_{gate,up,down}_exps` of shape
(experts, rows, row_bytes), or, in files converted before llama.cpp merged them, one 2-D tensor
per expert, `ffn_{gate,up,down}.E` (GGUFModel.expert_tensors). `expert(layer, e)` returns the
three matrices of one expert as
`QuantTensor`s: zero-copy views, either into the file's memory map or, after `pack()`, into a
host arena where each expert is one contiguous span [gate | up | down] (hybrimoe/layout.py).
That span is what one PCIe copy moves to a GPU slot.

Pinning: with CUDA present the arena is page-locked (registered in place, transfer.host_zeros:
torch's pinned allocator would round each layer up to a power of two), so a copy to the GPU is
one DMA without a staging buffer. We pack into a pinned arena rather than pinning the
mmap in place (cudaHostRegister): in a GGUF the gate, up and down blocks of one expert lie in
three different tensors, so in place an expert is three scattered spans (three DMAs, three
events) and registering a multi-GB file mapping pins the page cache of the whole file. The
arena costs one pass over the expert bytes at load (memory-bandwidth bound: ~0.3 s per GB here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelConfigError, UnsupportedQuantError
from .formats import EXPERT_QTYPES, QuantTensor, qtype_name
from .gguf_model import GGUFModel
from .layout import ExpertLayout


@dataclass(frozen=True)
class ExpertWeights:
    """gate, up: (inter, hidden); down: (hidden, inter) — raw blocks of one routed expert."""

    gate: QuantTensor
    up: QuantTensor
    down: QuantTensor

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


def expert_views(span: np.ndarray, lay: ExpertLayout) -> ExpertWeights:
    """Zero-copy QuantTensor views of one expert slot `span` (uint8 (>= lay.nbytes,)) laid out as
    [gate | up | down] by `lay` — used for host arenas, emulated GPU slots and in-memory stores."""
    H, inter = lay.hidden, lay.inter
    return ExpertWeights(
        QuantTensor(span[lay.gate_offset: lay.gate_offset + lay.gate_bytes].reshape(inter, -1), lay.gate_type, (inter, H)),
        QuantTensor(span[lay.up_offset: lay.up_offset + lay.up_bytes].reshape(inter, -1), lay.up_type, (inter, H)),
        QuantTensor(span[lay.down_offset: lay.down_offset + lay.down_bytes].reshape(H, -1), lay.down_type, (H, inter)),
    )


class ExpertStore:
    """Per (layer, expert) raw gate/up/down blocks of a GGUFModel.

    layers: the MoE layer indices (model.config.moe_layers)
    layout(layer): ExpertLayout of that layer (types may differ per layer in a Q4_K_M file)
    expert(layer, e): ExpertWeights (zero-copy views)
    span(layer, e): uint8 (layout.nbytes,) contiguous bytes of the expert (after pack())
    """

    def __init__(self, model: GGUFModel):
        self.model = model
        cfg = model.config
        self.config = cfg
        self.layers = cfg.moe_layers
        self._tensors: dict[int, tuple] = {}  # layer -> (gate, up, down): 3-D array or list of E 2-D
        self._layouts: dict[int, ExpertLayout] = {}
        for layer in self.layers:
            parts, types = [], []
            for which in ("gate", "up", "down"):
                names, qt, data = model.expert_tensors(layer, which)
                if qt not in EXPERT_QTYPES:
                    raise UnsupportedQuantError(
                        f"{model.path}: expert tensor {names[0]!r} is {qtype_name(qt)}; supported expert "
                        f"types are {', '.join(qtype_name(q) for q in EXPERT_QTYPES)} (a Q4_K_M file)"
                    )
                parts.append(data)
                types.append(qt)
            self._tensors[layer] = tuple(parts)  # type: ignore[assignment]
            self._layouts[layer] = ExpertLayout(cfg.hidden, cfg.expert_ffn, *types)
        self._arena: dict[int, np.ndarray] = {}
        self._arena_t: dict = {}  # layer -> torch uint8 (E, nbytes) owning the arena's memory
        self._pinned: dict[int, bool] = {}

    def _check(self, layer: int, e: int) -> None:
        if layer not in self._layouts:
            where = f"{self.model.path}: " if getattr(self, "model", None) is not None else ""
            raise ModelConfigError(f"{where}layer {layer} has no routed experts (MoE layers: {list(self.layers)})")
        if not 0 <= e < self.config.n_experts:
            raise ModelConfigError(f"expert index {e} out of range 0..{self.config.n_experts - 1}")

    def layout(self, layer: int) -> ExpertLayout:
        self._check(layer, 0)
        return self._layouts[layer]

    def expert(self, layer: int, e: int) -> ExpertWeights:
        self._check(layer, e)
        lay = self._layouts[layer]
        if layer in self._arena:
            return expert_views(self._arena[layer][e], lay)
        H, inter = self.config.hidden, self.config.expert_ffn
        gt, ut, dt = self._tensors[layer]
        g, u, d = gt[e], ut[e], dt[e]
        return ExpertWeights(
            QuantTensor(g, lay.gate_type, (inter, H)),
            QuantTensor(u, lay.up_type, (inter, H)),
            QuantTensor(d, lay.down_type, (H, inter)),
        )

    def pack(self, layers=None, pin: bool | None = None) -> None:
        """Copy each layer's experts into a host arena (E, layout.nbytes), one span per expert.

        pin: page-lock the arena (default: when CUDA is available). A layer already packed is
        left as it is (its views may be held by a runtime)."""
        import torch

        from .transfer import host_zeros

        if pin is None:
            pin = torch.cuda.is_available()
        for layer in layers if layers is not None else self.layers:
            if layer in self._arena:
                continue
            lay = self._layouts[layer]
            E = self.config.n_experts
            buf = host_zeros((E, lay.nbytes), bool(pin))
            arena = buf.numpy()
            for (off, nb), src in zip(((lay.gate_offset, lay.gate_bytes), (lay.up_offset, lay.up_bytes),
                                       (lay.down_offset, lay.down_bytes)), self._tensors[layer]):
                if isinstance(src, np.ndarray):  # one 3-D tensor (E, rows, row_bytes)
                    arena[:, off: off + nb] = src.reshape(E, -1)
                else:  # one tensor per expert (older files)
                    for e, m in enumerate(src):
                        arena[e, off: off + nb] = m.reshape(-1)
            self._arena[layer] = arena
            self._arena_t[layer] = buf  # keep the torch owner alive (pinned allocation)
            self._pinned[layer] = bool(pin)

    @property
    def pinned(self) -> bool:
        """True when every packed layer's arena is page-locked (and at least one is packed)."""
        return bool(self._pinned) and all(self._pinned.values())

    def span(self, layer: int, e: int) -> np.ndarray:
        """Contiguous bytes [gate | up | down] of one expert; packs the layer on first use."""
        self._check(layer, e)
        if layer not in self._arena:
            self.pack([layer])
        return self._arena[layer][e]

    def arena_tensor(self, layer: int):
        """The layer's host arena as a torch uint8 tensor (E, layout.nbytes), pinned if CUDA."""
        self._check(layer, 0)
        if layer not in self._arena:
            self.pack([layer])
        return self._arena_t[layer]

    def dequant_expert(self, layer: int, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (gate (I, H), up (I, H), down (H, I)) — for references and tests."""
        w = self.expert(layer, e)
        return w.gate.dequantize(), w.up.dequantize(), w.down.dequantize()

    @property
    def expert_bytes(self) -> int:
        """Total bytes of routed-expert weights in the file."""
        return sum(int(t.nbytes) if isinstance(t, np.ndarray) else sum(int(m.nbytes) for m in t)
                   for ts in self._tensors.values() for t in ts)
