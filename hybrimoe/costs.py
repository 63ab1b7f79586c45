"""Cost model: how long one routed expert takes on the CPU, on the GPU, and over PCIe.

Every time is in SECONDS. Per MoE layer (`LayerCost`):

    cpu_time(n)    one expert, n tokens, on the CPU pool      piecewise-linear in n through points
    gpu_time(n)    one expert, n tokens, from a GPU slot      piecewise-linear in n through points
    transfer_time  one expert's bytes host -> GPU slot        constant (same bytes every time)
    dense_time(n)  the layer's non-routed work (attention, shared experts) for n tokens, on the GPU
    cpu_layer_overhead / gpu_layer_overhead   paid once per layer when that device gets >= 1 expert
                   (CPU: submit + join of the thread pool; GPU: the grouped-MoE launch)

Points are (token count, seconds); between points the time is linear, beyond the last point it
extends the last segment, below the first it is clamped. The model is the same object whether it
was measured (`calibrate`, cached as JSON per machine and shape) or written down from datasheet
numbers (`CostModel.paper_a6000`), so the scheduler and the simulator never know the difference.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import HybrimoeError

DEFAULT_TOKEN_POINTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class CostModelError(HybrimoeError, ValueError):
    """A cost model file or measurement is unusable (missing key, non-positive time, bad points)."""


def _interp(points_n: tuple, points_t: tuple, n: float) -> float:
    """Piecewise-linear through (points_n, points_t), clamped below, last segment extended above.
    Plain Python (bisect): the scheduler calls it a few hundred times per layer, where numpy's
    per-call overhead (~2.5 us) was most of the planning time."""
    xs, ys = points_n, points_t
    if n <= xs[0] or len(xs) == 1:
        return float(ys[0])
    if n >= xs[-1]:  # extend the last segment (compute-bound slope) past the last measurement
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (n - xs[-1]))
    j = bisect.bisect_right(xs, n)  # xs[j-1] <= n < xs[j]
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return float(y0 + (y1 - y0) * (n - x0) / (x1 - x0))


_MEMO_MAX = 4096  # memoised token counts per LayerCost and lane


@dataclass(frozen=True)
class LayerCost:
    """Costs of one MoE layer's shape. *_s tuples are seconds at `token_points` tokens."""

    token_points: tuple[int, ...]
    cpu_s: tuple[float, ...]
    gpu_s: tuple[float, ...]
    transfer_s: float
    expert_bytes: int
    dense_s: tuple[float, ...] = ()
    cpu_layer_overhead: float = 0.0
    gpu_layer_overhead: float = 0.0

    def __post_init__(self):
        n = len(self.token_points)
        if n == 0 or list(self.token_points) != sorted(set(self.token_points)):
            raise CostModelError(f"token_points must be strictly increasing, found {self.token_points}")
        for name in ("cpu_s", "gpu_s") + (("dense_s",) if self.dense_s else ()):
            v = getattr(self, name)
            if len(v) != n or min(v) < 0:
                raise CostModelError(f"{name}: expected {n} non-negative times, found {v}")
        if self.transfer_s < 0 or self.expert_bytes <= 0:
            raise CostModelError(f"transfer_s={self.transfer_s}, expert_bytes={self.expert_bytes}: "
                                 "expected >= 0 s and > 0 bytes")
        # memo of evaluated token counts (not a dataclass field: equality and JSON ignore it)
        object.__setattr__(self, "_memo", ({}, {}))

    def _lookup(self, lane: int, ys: tuple, n: float) -> float:
        memo = self._memo[lane]
        t = memo.get(n)
        if t is None:
            t = _interp(self.token_points, ys, n)
            if len(memo) < _MEMO_MAX:
                memo[n] = t
        return t

    def cpu_time(self, n: float) -> float:
        return self._lookup(0, self.cpu_s, n)

    def gpu_time(self, n: float) -> float:
        return self._lookup(1, self.gpu_s, n)

    def dense_time(self, n: float) -> float:
        return _interp(self.token_points, self.dense_s, n) if self.dense_s else 0.0


@dataclass(frozen=True)
class CostModel:
    """Costs per MoE layer. `layers` has one LayerCost per layer, or one shared by all layers."""

    layers: tuple[LayerCost, ...]
    name: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def layer(self, layer: int) -> LayerCost:
        return self.layers[0] if len(self.layers) == 1 else self.layers[layer]

    def cpu_time(self, layer: int, n: float) -> float:
        return self.layer(layer).cpu_time(n)

    def gpu_time(self, layer: int, n: float) -> float:
        return self.layer(layer).gpu_time(n)

    def transfer_time(self, layer: int) -> float:
        return self.layer(layer).transfer_s

    def dense_time(self, layer: int, n: float) -> float:
        return self.layer(layer).dense_time(n)

    # ------------------------------------------------------------------------------ json
    def to_json(self) -> str:
        return json.dumps({"name": self.name, "meta": self.meta,
                           "layers": [asdict(lc) for lc in self.layers]}, indent=1)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "CostModel":
        """From a JSON string or a path to a .json file written by `save` / `to_json`."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).read_text()
            except OSError as e:
                raise CostModelError(f"cost model {text!r}: cannot read it ({e.strerror}); give a JSON file the "
                                     "runtime wrote (~/.cache/hybrimoe/costs/) or paper-a6000") from None
        try:
            d = json.loads(text)
            layers = tuple(LayerCost(**{k: tuple(v) if isinstance(v, list) else v for k, v in lc.items()})
                           for lc in d["layers"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CostModelError(f"cost model JSON unreadable ({e}); expected keys name, meta, layers") from e
        return cls(layers, d.get("name", ""), d.get("meta", {}))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json())

    # --------------------------------------------------------------------- hand-given models
    @classmethod
    def roofline(cls, *, hidden: int, inter: int, bits_per_weight: float, gpu_bw: float, gpu_flops: float,
                 cpu_bw: float, cpu_flops: float, pcie_bw: float, gpu_expert_overhead: float,
                 cpu_expert_overhead: float, transfer_overhead: float, dense_bytes: float,
                 dense_overhead: float, cpu_layer_overhead: float, gpu_layer_overhead: float,
                 token_points: Sequence[int] = DEFAULT_TOKEN_POINTS, name: str = "") -> "CostModel":
        """Model from bandwidths and FLOP rates (all EFFECTIVE, bytes/s and FLOP/s):
        t(n) = overhead + max(expert_bytes / bw, 6 * hidden * inter * n / flops)   (3 matmuls, 2 FLOP/MAC)
        """
        nbytes = 3 * hidden * inter * bits_per_weight / 8
        flop = 6 * hidden * inter
        pts = tuple(int(n) for n in token_points)
        cpu = tuple(cpu_expert_overhead + max(nbytes / cpu_bw, flop * n / cpu_flops) for n in pts)
        gpu = tuple(gpu_expert_overhead + max(nbytes / gpu_bw, flop * n / gpu_flops) for n in pts)
        # dense part: weights read once per step; its FLOPs grow with n like an expert's would
        dense_flop_per_byte = flop / nbytes
        dense = tuple(dense_overhead + max(dense_bytes / gpu_bw, dense_bytes * dense_flop_per_byte * n / gpu_flops)
                      for n in pts)
        lc = LayerCost(pts, cpu, gpu, transfer_overhead + nbytes / pcie_bw, int(nbytes), dense,
                       cpu_layer_overhead, gpu_layer_overhead)
        return cls((lc,), name, {"hidden": hidden, "inter": inter, "bits_per_weight": bits_per_weight})

    @classmethod
    def paper_a6000(cls, model: str = "deepseek-v2-lite") -> "CostModel":
        """The paper's testbed written down from datasheet numbers (not measured here).

        Machine: RTX A6000 (768 GB/s GDDR6, ~155 TFLOP/s dense fp16 tensor), PCIe 4.0 x16, a
        10-core Xeon with AVX-512. Experts in Q4_K (4.5 bits/weight: 144 B per 256 weights).
          GPU  bandwidth 768 GB/s x 0.70 achieved by dequant-GEMV kernels     = 538 GB/s
               compute 155 TFLOP/s x 0.5 for dequant + grouped GEMM           = 77 TFLOP/s
               5 us per expert (kernel tail, small-GEMM inefficiency), 10 us per layer launch
          PCIe 32 GB/s raw x16 gen4, ~25 GB/s measured pinned H2D; +10 us per expert (3 copies, event)
          CPU  6-channel DDR4-2933 = 141 GB/s peak, ~80 GB/s reachable by 10 cores streaming
               10 cores x 2.4 GHz x 64 FP32 FLOP/cycle = 1.5 TFLOP/s peak, ~0.4 achieved on Q4 dots
               20 us per expert (work split + barrier), 30 us per layer (submit + join)
        Shapes:
          deepseek-v2-lite (also used for FLAME-290M traces, same 64-expert top-6 layout):
              hidden 2048, inter 1408 -> 4.87 MB/expert: GPU 14 us, CPU 81 us, PCIe 205 us (1 token)
              dense/layer ~34 M params (MLA attention + 2 shared experts) = 19 MB -> 66 us
          mixtral: hidden 4096, inter 14336 -> 99 MB/expert: GPU 189 us, CPU 1.26 ms, PCIe 3.97 ms
              dense/layer = GQA attention 42 M params = 23.6 MB -> 74 us
        """
        shapes = {"deepseek-v2-lite": (2048, 1408, 34e6), "flame": (2048, 1408, 34e6),
                  "mixtral": (4096, 14336, 42e6)}
        if model not in shapes:
            raise CostModelError(f"paper_a6000: unknown model {model!r} (expected one of {sorted(shapes)})")
        hidden, inter, dense_params = shapes[model]
        return cls.roofline(hidden=hidden, inter=inter, bits_per_weight=4.5, gpu_bw=538e9, gpu_flops=77e12,
                            cpu_bw=80e9, cpu_flops=0.4e12, pcie_bw=25e9, gpu_expert_overhead=5e-6,
                            cpu_expert_overhead=20e-6, transfer_overhead=10e-6,
                            dense_bytes=dense_params * 4.5 / 8, dense_overhead=30e-6,
                            cpu_layer_overhead=30e-6, gpu_layer_overhead=10e-6,
                            name=f"paper-a6000-{model}")


# ---------------------------------------------------------------------------- calibration
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def l3_bytes() -> int:
    """Size of the CPU's last-level (L3) cache from sysfs; 32 MiB when it cannot be read."""
    try:
        for idx in range(8):
            base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{idx}")
            if (base / "level").read_text().strip() == "3":
                s = (base / "size").read_text().strip()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
                return int(s.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 32 << 20


def machine_id(gpu_name: str = "") -> str:
    """Host name + CPU model (+ the GPU name the caller passes; nothing probes CUDA here)."""
    return f"{platform.node()}|{cpu_model()}|{os.cpu_count()}|{gpu_name}"


def cache_path(cache_dir: str | Path, machine: str, shape_key: str) -> Path:
    """JSON file for one (machine, shapes) pair: <cache_dir>/costs-<sha1 prefix>.json."""
    h = hashlib.sha1(f"{machine}#{shape_key}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"costs-{h}.json"


def calibrate(measure_cpu: Callable[[int], float], measure_gpu: Callable[[int], float],
              measure_transfer: Callable[[], float], token_points: Sequence[int] = DEFAULT_TOKEN_POINTS, *,
              expert_bytes: int, measure_dense: Callable[[int], float] | None = None,
              cpu_layer_overhead: float = 0.0, gpu_layer_overhead: float = 0.0, name: str = "calibrated",
              meta: dict | None = None) -> CostModel:
    """Measure each callable at `token_points` and fit the piecewise-linear model.

    measure_cpu(n) / measure_gpu(n): seconds for ONE expert over n tokens (the caller takes the
    median of its repeats); measure_transfer(): seconds for one expert host -> GPU slot.
    Fit: the points are kept as measured, then made non-decreasing in n (running maximum): more
    tokens never take less time, and a noisy dip would make the scheduler prefer bigger batches.
    """
    pts = tuple(sorted({int(n) for n in token_points}))

    def series(f, what):
        v = np.array([float(f(n)) for n in pts])
        if not np.all(np.isfinite(v)) or (v <= 0).any():
            raise CostModelError(f"calibrate: {what} returned {v.tolist()} (expected positive seconds)")
        return tuple(np.maximum.accumulate(v).tolist())

    tr = float(measure_transfer())
    if not tr > 0:
        raise CostModelError(f"calibrate: measure_transfer returned {tr} (expected positive seconds)")
    lc = LayerCost(pts, series(measure_cpu, "measure_cpu"), series(measure_gpu, "measure_gpu"), tr,
                   int(expert_bytes), series(measure_dense, "measure_dense") if measure_dense else (),
                   cpu_layer_overhead, gpu_layer_overhead)
    return CostModel((lc,), name, dict(meta or {}))


def load_or_calibrate(cache_dir: str | Path, shape_key: str, calibrate_fn: Callable[[], CostModel],
                      gpu_name: str = "", refresh: bool = False) -> CostModel:
    """Cached calibration: reuse <cache_dir>/costs-*.json for this machine and shapes, else
    run `calibrate_fn()` and store its result."""
    mid = machine_id(gpu_name)
    path = cache_path(cache_dir, mid, shape_key)
    if path.exists() and not refresh:
        return CostModel.from_json(path)
    cm = calibrate_fn()
    cm = replace(cm, meta={**cm.meta, "machine": mid, "shape_key": shape_key})
    cm.save(path)
    return cm


def resolve(spec: str, model_hint: str = "deepseek-v2-lite") -> CostModel:
    """CLI helper: 'paper-a6000' (shape from model_hint), 'paper-a6000:mixtral', or a JSON path."""
    if spec.startswith("paper-a6000"):
        model = spec.split(":", 1)[1] if ":" in spec else model_hint
        return CostModel.paper_a6000(model)
    return CostModel.from_json(spec)
