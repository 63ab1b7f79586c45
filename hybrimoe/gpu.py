"""GPU expert execution: fused MoE over the slot arena, and block dequantization (Triton).

Runtime-facing API (nothing here imports Triton or touches CUDA until a function is called):

    moe_forward(x, topk_ids, topk_weights, slot_of_expert, arena, layout, out=None) -> out
    moe_forward_ref(...)                       readable torch twin (same arguments, fp32 result)
    dequantize(raw, qtype, shape, dtype)       raw GGUF blocks on the device -> dense tensor
    align_pairs(topk_ids, slot_of_expert, block_m)   prefill grouping of (token, k) pairs by expert
    load_config(device_name, hidden, inter)    launch configuration from kernels/triton/configs.json
    cuda_q4k_gemv(w_raw, x, n_rows, n_cols)    plain CUDA Q4_K GEMV (kernels/cuda), bench second opinion
    random_quant_rows / random_arena           random blocks / expert arenas for tests and benchmarks

Paths: T <= config.decode_max_tokens (16) takes the decode path (no sort; each expert's tiles are
read once for all its tokens); larger T sorts pairs by expert first (prefill path, tl.dot tiles).
Either way the layer is gate_up + down + combine: three kernel launches for decode, plus the
align step's small torch ops for prefill. No host synchronisation on any path (CUDA-graph safe
for fixed shapes).

Tensors may live on CPU only when TRITON_INTERPRET=1 (the tests); otherwise they must be CUDA.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .errors import KernelInputError, QuantShapeError
from .formats import EXPERT_QTYPES, block_elems, qtype_name, row_bytes
from .layout import ExpertLayout

__all__ = [
    "LaunchConfig",
    "MoeConfig",
    "align_pairs",
    "cuda_q4k_gemv",
    "dequantize",
    "dequantize_ref",
    "expert_weights",
    "load_config",
    "moe_forward",
    "moe_forward_ref",
    "random_arena",
    "random_quant_rows",
]


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape and launch options of one kernel. block_k must be a multiple of 32."""

    block_m: int = 1
    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class MoeConfig:
    decode_gate_up: LaunchConfig = LaunchConfig()
    decode_down: LaunchConfig = LaunchConfig()
    prefill_gate_up: LaunchConfig = LaunchConfig(64, 64, 32, num_warps=8)
    prefill_down: LaunchConfig = LaunchConfig(64, 64, 32, num_warps=8)
    combine: LaunchConfig = LaunchConfig(block_n=1024)
    dequant: LaunchConfig = LaunchConfig()
    decode_max_tokens: int = 16


_LAUNCH_KEYS = {f.name for f in fields(LaunchConfig)}


def _merge(cfg: MoeConfig, entry: dict, where: str) -> MoeConfig:
    changes = {}
    for key, val in entry.items():
        if key.startswith("_"):  # comments and measurements ("_doc", "_measured")
            continue
        if key == "decode_max_tokens":
            changes[key] = int(val)
            continue
        if not isinstance(val, dict) or not hasattr(cfg, key):
            raise KernelInputError(f"configs.json {where}: unknown key {key!r}")
        bad = set(val) - _LAUNCH_KEYS
        if bad:
            raise KernelInputError(f"configs.json {where}.{key}: unknown fields {sorted(bad)} "
                                   f"(expected a subset of {sorted(_LAUNCH_KEYS)})")
        changes[key] = replace(getattr(cfg, key), **{k: int(v) for k, v in val.items()})
    return replace(cfg, **changes)


@functools.lru_cache(maxsize=None)
def _config_table() -> dict:
    from importlib import resources

    text = resources.files("hybrimoe.triton_kernels").joinpath("configs.json").read_text()
    return json.loads(text)


def load_config(device_name: str | None, hidden: int, inter: int) -> MoeConfig:
    """Launch configuration for a device (torch.cuda.get_device_name()) and expert shape.

    Lookup order, later entries overriding earlier ones field by field: built-in defaults,
    configs.json "default", devices[name]["default"], devices[name]["<hidden>x<inter>"].
    """
    table = _config_table()
    cfg = _merge(MoeConfig(), table.get("default", {}), "default")
    dev = table.get("devices", {}).get(device_name or "", {})
    cfg = _merge(cfg, dev.get("default", {}), f"devices[{device_name!r}].default")
    shape_key = f"{hidden}x{inter}"
    if shape_key in dev:
        cfg = _merge(cfg, dev[shape_key], f"devices[{device_name!r}][{shape_key!r}]")
    return cfg


@functools.lru_cache(maxsize=None)
def _device_config(device: torch.device, hidden: int, inter: int) -> MoeConfig:
    """load_config for a tensor's device, memoised (it is looked up on every layer call)."""
    # CPU tensors only reach the kernels under TRITON_INTERPRET=1: interpreter-friendly tiles
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    return load_config(name, hidden, inter)


# ----------------------------------------------------------------------------- helpers
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise KernelInputError(f"{name}: on {t.device}, expected {device} (the device of x)")


def _kernels():
    """Import the Triton modules on first use (never at hybrimoe import time)."""
    try:
        from hybrimoe.triton_kernels import dequant, moe
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("hybrimoe.gpu needs Triton: pip install 'hybrimoe[gpu]'") from exc
    return dequant, moe


def _dot_dtype(dtype: torch.dtype):
    import triton.language as tl

    if dtype == torch.bfloat16 and _interpreting():
        # Triton 3.6's CPU interpreter computes tl.dot on bf16 operands wrongly (numpy has no
        # bf16; results off by ~1e10 in a 16x16 check): multiply in fp32 there. Compiled runs use bf16.
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------- dequantize
def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, int],
               dtype: torch.dtype = torch.float32, config: MoeConfig | None = None) -> torch.Tensor:
    """Dequantize raw GGUF blocks on the device.

    raw:   uint8, (rows, row_bytes) or flat (rows * row_bytes,), contiguous, CUDA (or CPU under
           TRITON_INTERPRET=1); row r holds W[r, :]
    qtype: Q4_K, Q6_K, Q5_0 or Q8_0 (hybrimoe.formats ids)
    shape: (rows, cols) of the float matrix; cols a multiple of the type's block size
    dtype: float32, bfloat16 or float16
    Returns (rows, cols) `dtype` on raw's device; bit-identical to formats.dequantize in float32.
    """
    qtype = int(qtype)
    if qtype not in EXPERT_QTYPES:
        raise KernelInputError(f"dequantize: qtype {qtype_name(qtype)} is not one of "
                               f"{[qtype_name(t) for t in EXPERT_QTYPES]}")
    rows, cols = (int(s) for s in shape)
    rb = row_bytes(qtype, cols, "dequantize")
    if raw.dtype != torch.uint8 or raw.numel() != rows * rb or not raw.is_contiguous():
        raise QuantShapeError(f"dequantize: raw must be contiguous uint8 with {rows}*{rb} bytes for "
                              f"{qtype_name(qtype)} {shape}, found {raw.dtype} {tuple(raw.shape)}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KernelInputError(f"dequantize: dtype must be float32/bfloat16/float16, found {dtype}")
    out = torch.empty(rows, cols, dtype=dtype, device=raw.device)
    if rows == 0:
        return out
    dq, _ = _kernels()
    cfg = (config or _device_config(raw.device, cols, cols)).dequant
    bk = min(cfg.block_k, _next_pow2(max(cols, 32)))
    grid = (-(-rows // cfg.block_n), -(-cols // bk))
    dq.dequantize_kernel[grid](raw, out, rows, cols, rb, out.stride(0), QTYPE=qtype,
                               BN=cfg.block_n, BK=bk, num_warps=cfg.num_warps)
    return out


def dequantize_ref(raw, qtype: int, shape: tuple[int, int]) -> np.ndarray:
    """Readable twin of dequantize: numpy float32 (rows, cols) via formats.dequantize."""
    from .formats import dequantize as fmt_dequantize

    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(shape[0], -1)
    return np.asarray(fmt_dequantize(raw, int(qtype), tuple(shape)), dtype=np.float32)


# ----------------------------------------------------------------------------- MoE
def align_pairs(topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, block_m: int):
    """Group the resident (token, k) pairs by expert into m-blocks of at most block_m rows.

    topk_ids: (T, K) int, slot_of_expert: (E,) int32. Pair p = t*K + k. Returns int32 tensors
      sorted_pairs (P,):   resident pairs sorted by expert (stable), non-resident ones last
      blk_expert (NB,):    expert of each m-block, -1 for surplus blocks
      blk_start, blk_end:  each m-block's range [start, min(start + block_m, end)) in sorted_pairs
    NB = cdiv(P, block_m) + min(E, P), an upper bound known without a host sync.
    """
    dev = topk_ids.device
    n_exp = slot_of_expert.numel()
    e = topk_ids.reshape(-1).long()
    p = e.numel()
    resident = slot_of_expert.long()[e] >= 0
    key = torch.where(resident, e, torch.full_like(e, n_exp))
    order = torch.sort(key, stable=True).indices
    # scatter-add, not torch.bincount: bincount reads the max id back to the host on CUDA.
    counts = torch.zeros(n_exp + 1, dtype=torch.long, device=dev).index_add_(
        0, key, torch.ones_like(key))[:n_exp]
    nblk = (counts + block_m - 1) // block_m
    blk_end_cum = torch.cumsum(nblk, 0)
    pair_end_cum = torch.cumsum(counts, 0)
    nb = -(-p // block_m) + min(n_exp, p)
    b = torch.arange(nb, device=dev)
    eb = torch.searchsorted(blk_end_cum, b, right=True)
    ok = eb < n_exp
    ebc = eb.clamp(max=n_exp - 1)
    first_blk = blk_end_cum[ebc] - nblk[ebc]
    start = pair_end_cum[ebc] - counts[ebc] + (b - first_blk) * block_m
    end = pair_end_cum[ebc]
    blk_expert = torch.where(ok, ebc, torch.full_like(ebc, -1))
    i32 = torch.int32
    return order.to(i32), blk_expert.to(i32), start.to(i32), end.to(i32)


def _check_moe_inputs(x, topk_ids, topk_weights, slot_of_expert, arena, layout, out):
    if not isinstance(layout, ExpertLayout):
        raise KernelInputError(f"layout: expected ExpertLayout, found {type(layout).__name__}")
    if x.dim() != 2 or x.shape[1] != layout.hidden:
        raise KernelInputError(f"x: expected (T, {layout.hidden}), found {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.stride(1) != 1:
        raise KernelInputError(f"x: expected float32/bfloat16/float16 with unit column stride, "
                               f"found {x.dtype} strides {x.stride()}")
    dev = x.device
    if dev.type != "cuda" and not _interpreting():
        raise KernelInputError(f"x: on {dev}; the Triton kernels need CUDA tensors "
                               "(or TRITON_INTERPRET=1 for CPU testing)")
    t = x.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.dtype not in (torch.int32, torch.int64):
        raise KernelInputError(f"topk_ids: expected ({t}, K) int32/int64, found "
                               f"{topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise KernelInputError(f"topk_weights: expected float32 {tuple(topk_ids.shape)}, found "
                               f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
    if slot_of_expert.dim() != 1 or slot_of_expert.dtype != torch.int32:
        raise KernelInputError(f"slot_of_expert: expected (E,) int32, found "
                               f"{slot_of_expert.dtype} {tuple(slot_of_expert.shape)}")
    nbytes = layout.nbytes
    if arena.dtype != torch.uint8 or not arena.is_contiguous() or arena.numel() % nbytes:
        raise KernelInputError(f"arena: expected contiguous uint8 of n_slots * {nbytes} bytes "
                               f"({layout.describe()}), found {arena.dtype} {tuple(arena.shape)}")
    if arena.data_ptr() % 16:
        raise KernelInputError(f"arena: data must start 16-byte aligned (the Q4_K GEMV reads aligned "
                               f"words), found address % 16 = {arena.data_ptr() % 16}")
    for name, tensor in (("topk_ids", topk_ids), ("topk_weights", topk_weights),
                         ("slot_of_expert", slot_of_expert), ("arena", arena)):
        _check_device(name, tensor, dev)
    if out is not None:
        if out.shape != x.shape or out.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
                or out.stride(1) != 1:
            raise KernelInputError(f"out: expected {tuple(x.shape)} float32/bfloat16/float16 with "
                                   f"unit column stride, found {out.dtype} {tuple(out.shape)}")
        _check_device("out", out, dev)


def moe_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                slot_of_expert: torch.Tensor, arena: torch.Tensor, layout: ExpertLayout,
                out: torch.Tensor | None = None, *, accumulate: bool = False,
                config: MoeConfig | None = None, path: str = "auto") -> torch.Tensor:
    """Routed-expert output of the GPU-resident experts of one MoE layer.

    x:              (T, H) float32/bfloat16/float16, unit column stride
    topk_ids:       (T, K) int32/int64 contiguous, expert ids local to the layer (0..E-1),
                    distinct within a row
    topk_weights:   (T, K) float32 contiguous, routing weights (applied here)
    slot_of_expert: (E,) int32, arena slot of each expert or -1 when it is not on the GPU; pairs of
                    such experts are skipped (the CPU computes them)
    arena:          uint8, (n_slots, layout.nbytes) or flat, contiguous; slot s holds one expert as
                    [gate | up | down] (hybrimoe.layout.ExpertLayout)
    out:            optional (T, H) float32/bfloat16/float16 to write into (overwritten)
    accumulate:     add into `out` instead (e.g. out already holds the CPU experts' share); needs out
    config:         launch configuration (default: load_config for this device and shape)
    path:           "auto", "decode" (T <= 16) or "prefill"
    Returns out, (T, H): out[t] = sum over resident k of w[t,k] * down(silu(gate x[t]) * up x[t]),
    0 for tokens with no resident expert; float32 unless `out` says otherwise.
    Numerics: fp32 accumulation; with bf16/fp16 x the dequantized tiles enter tl.dot in x's dtype
    (decode with T == 1 multiplies in fp32) and the SiLU*up intermediate is stored in x's dtype.
    The per-token sum over k runs in fixed order: results are deterministic (no atomics).
    """
    _check_moe_inputs(x, topk_ids, topk_weights, slot_of_expert, arena, layout, out)
    t, hidden = x.shape
    k = topk_ids.shape[1]
    inter = layout.inter
    if out is None:
        if accumulate:
            raise KernelInputError("accumulate=True needs `out` (the tensor to add into)")
        out = torch.empty(t, hidden, dtype=torch.float32, device=x.device)
    if t == 0:
        return out
    if k == 0:
        return out if accumulate else out.zero_()
    _, mk = _kernels()
    cfg = config or _device_config(x.device, hidden, inter)
    if path == "auto":
        path = "decode" if t <= min(cfg.decode_max_tokens, 16) else "prefill"
    if path not in ("decode", "prefill"):
        raise KernelInputError(f"path: expected 'auto', 'decode' or 'prefill', found {path!r}")
    if path == "decode" and t > 16:
        raise KernelInputError(f"path='decode' handles at most 16 tokens, found {t}")

    ids = topk_ids.contiguous()
    wts = topk_weights.contiguous()
    p = t * k
    kp = _next_pow2(k)
    h_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    h = torch.empty(p, inter, dtype=h_dtype, device=x.device)
    y = torch.empty(p, hidden, dtype=torch.float32, device=x.device)
    dot_dtype = _dot_dtype(x.dtype)
    slot_bytes = layout.nbytes
    if path == "decode":
        bm = 1 if t == 1 else 16
        gu, dn = replace(cfg.decode_gate_up, block_m=bm), replace(cfg.decode_down, block_m=bm)
        dummy = slot_of_expert  # grouping arrays unused on this path
        grouping = (dummy, dummy, dummy, dummy)
        n_mblocks = p
        grouped = False
    else:
        gu, dn = cfg.prefill_gate_up, cfg.prefill_down
        if gu.block_m < 16 or gu.block_m & (gu.block_m - 1):
            raise KernelInputError(f"config: prefill block_m must be a power of two >= 16 (tl.dot), "
                                   f"found {gu.block_m}")
        if gu.block_m != dn.block_m:
            raise KernelInputError(f"config: prefill gate_up and down need the same block_m, found "
                                   f"{gu.block_m} and {dn.block_m}")
        grouping = align_pairs(ids, slot_of_expert, gu.block_m)
        n_mblocks = grouping[1].numel()
        grouped = True
    for lc, name in ((gu, "gate_up"), (dn, "down")):
        if lc.block_k % 32 or lc.block_k & (lc.block_k - 1):
            raise KernelInputError(f"config {name}: block_k must be a power of two >= 32, found {lc.block_k}")
        if lc.block_m == 1 and lc.block_k % 256:
            raise KernelInputError(f"config decode {name}: block_k must be a multiple of 256 (the "
                                   f"one-token Q4_K GEMV reads whole super-blocks), found {lc.block_k}")
        if lc.block_m > 1 and lc.block_n < 16:
            raise KernelInputError(f"config {name}: block_n must be >= 16 for tl.dot, found {lc.block_n}")

    mk.gate_up_kernel[(n_mblocks, -(-inter // gu.block_n))](
        x, x.stride(0), ids, slot_of_expert, arena, slot_bytes, *grouping,
        h, t,
        layout.gate_offset, layout.up_offset,
        row_bytes(layout.gate_type, hidden), row_bytes(layout.up_type, hidden),
        K=k, H=hidden, I=inter, GATE_T=int(layout.gate_type), UP_T=int(layout.up_type), GROUPED=grouped,
        BM=gu.block_m, BN=gu.block_n, BK=gu.block_k, KP=kp, DOT_DTYPE=dot_dtype,
        num_warps=gu.num_warps, num_stages=gu.num_stages,
    )
    mk.down_kernel[(n_mblocks, -(-hidden // dn.block_n))](
        h, wts, ids, slot_of_expert, arena, slot_bytes, *grouping,
        y, t,
        layout.down_offset, row_bytes(layout.down_type, inter),
        K=k, H=hidden, I=inter, DOWN_T=int(layout.down_type), GROUPED=grouped,
        BM=dn.block_m, BN=dn.block_n, BK=dn.block_k, KP=kp, DOT_DTYPE=dot_dtype,
        num_warps=dn.num_warps, num_stages=dn.num_stages,
    )
    cb = cfg.combine
    bh = min(_next_pow2(cb.block_n), _next_pow2(hidden))
    mk.combine_kernel[(t, -(-hidden // bh))](
        y, ids, slot_of_expert, out, out.stride(0), K=k, H=hidden, KP=kp, BH=bh,
        ACCUMULATE=bool(accumulate), num_warps=cb.num_warps,
    )
    return out


def expert_weights(arena: torch.Tensor, layout: ExpertLayout, slot: int, dequant=None):
    """(gate (I, H), up (I, H), down (H, I)) float32 CPU tensors of the expert in `slot`.
    dequant(raw uint8 tensor, qtype, shape) -> tensor; default dequantize_ref (numpy). Pass
    hybrimoe.gpu.dequantize to dequantize on the device at large shapes (tested separately)."""
    raw = arena.reshape(-1, layout.nbytes)[slot]
    hid, inter = layout.hidden, layout.inter
    parts = ((layout.gate_offset, layout.gate_bytes, layout.gate_type, (inter, hid)),
             (layout.up_offset, layout.up_bytes, layout.up_type, (inter, hid)),
             (layout.down_offset, layout.down_bytes, layout.down_type, (hid, inter)))
    out = []
    for off, nbytes, qtype, shape in parts:
        if dequant is None:
            w = torch.from_numpy(dequantize_ref(raw[off:off + nbytes], qtype, shape))
        else:
            w = dequant(raw[off:off + nbytes].contiguous(), qtype, shape).float().cpu()
        out.append(w)
    return tuple(out)


def moe_forward_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    slot_of_expert: torch.Tensor, arena: torch.Tensor, layout: ExpertLayout,
                    dequant=None) -> torch.Tensor:
    """Readable twin of moe_forward (same arguments): fp32 (T, H) on x's device. The package's
    one MoE loop (reference.moe_routed) on the CPU, over the resident pairs only: the weights of
    pairs whose expert has slot -1 are zeroed (those experts contribute exactly 0)."""
    from .reference import moe_routed

    ids = topk_ids.detach().cpu().long()
    slots = slot_of_expert.detach().cpu().long()
    resident = slots[ids] >= 0
    wts = torch.where(resident, topk_weights.detach().cpu().float(), 0.0)
    hid = layout.hidden

    def experts(e):
        if slots[e] < 0:  # weight 0: a zero expert of width 1 is exact and costs nothing
            return torch.zeros(1, hid), torch.zeros(1, hid), torch.zeros(hid, 1)
        return expert_weights(arena, layout, int(slots[e]), dequant)

    out = moe_routed(x.detach().cpu().float(), ids, wts, experts)
    return out.to(x.device)


# ----------------------------------------------------------------------------- test and bench data
# Byte offset of each fp16 scale field inside a block, and the typical |quant * sub-scale| of
# random bytes, so that random weights come out with a row norm of about 1.
_SCALE_FIELDS = {
    # qtype: ((offset, value scale), ...)
    12: ((0, 1.0 / (32 * 8)), (2, 1.0 / (32 * 8))),  # Q4_K d, dmin (6-bit sc/m ~ 32, q ~ 8)
    14: ((208, 1.0 / (74 * 18)),),                    # Q6_K d (int8 scale ~ 74, q-32 ~ 18)
    6: ((0, 1.0 / 9.2),),                             # Q5_0 d (q-16 ~ 9.2)
    8: ((0, 1.0 / 74),),                              # Q8_0 d (int8 ~ 74)
}


def random_quant_rows(rows: int, cols: int, qtype: int, generator: torch.Generator | None = None,
                      device="cpu") -> torch.Tensor:
    """Random GGUF blocks (rows, row_bytes) uint8 whose weights have row norm ~1: random quant
    bytes, fp16 scales drawn from [0.5, 1.5] / (typical quant * sqrt(cols)). Fast at any size (no
    quantization), on any device; for tests and benchmarks."""
    qtype = int(qtype)
    rb = row_bytes(qtype, cols)
    be = block_elems(qtype)
    bb = rb // (cols // be)
    raw = torch.randint(0, 256, (rows, cols // be, bb), dtype=torch.uint8, device=device,
                        generator=generator)
    for off, scale in _SCALE_FIELDS[qtype]:
        val = (torch.rand(rows, cols // be, device=device, generator=generator) + 0.5)
        val = (val * (scale / cols ** 0.5)).to(torch.float16)
        raw[:, :, off:off + 2] = val.view(torch.uint8).reshape(rows, cols // be, 2)
    return raw.reshape(rows, rb)


def random_arena(layout: ExpertLayout, n_slots: int, generator: torch.Generator | None = None,
                 device="cpu") -> torch.Tensor:
    """(n_slots, layout.nbytes) uint8 arena of random experts (padding bytes zero)."""
    arena = torch.zeros(n_slots, layout.nbytes, dtype=torch.uint8, device=device)
    parts = ((layout.gate_offset, layout.gate_bytes, layout.gate_type, layout.inter, layout.hidden),
             (layout.up_offset, layout.up_bytes, layout.up_type, layout.inter, layout.hidden),
             (layout.down_offset, layout.down_bytes, layout.down_type, layout.hidden, layout.inter))
    for off, nbytes, qtype, rows, cols in parts:
        for s in range(n_slots):
            arena[s, off:off + nbytes] = random_quant_rows(rows, cols, qtype, generator, device).reshape(-1)
    return arena


# ----------------------------------------------------------------------------- CUDA second opinion
def _cuda_sources() -> tuple:
    """(q4k_gemv.cu path, include dir holding blocks.h) in the source tree / editable install."""
    from importlib import resources
    from pathlib import Path

    cu = Path(str(resources.files("hybrimoe.cuda_kernels").joinpath("q4k_gemv.cu"))).resolve()  # through links
    for inc in (cu.parent.parent / "cpu", cu.parent):
        if (inc / "blocks.h").is_file():
            return cu, inc
    raise FileNotFoundError(f"blocks.h not found next to {cu} (kernels/cpu); the CUDA GEMV needs "
                            "the source tree or an install that packages kernels/cpu/blocks.h")


def find_nvcc() -> str | None:
    """Path of nvcc: PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin; None if absent."""
    import shutil

    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if found is None and home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            found = os.path.join(home, "bin", "nvcc")
    return found


@functools.lru_cache(maxsize=None)
def _cuda_gemv_lib():
    import ctypes
    import hashlib
    import subprocess
    import tempfile
    from pathlib import Path

    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("cuda_q4k_gemv needs nvcc (on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin)")
    cu, inc = _cuda_sources()
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    key = hashlib.sha256(cu.read_bytes() + (inc / "blocks.h").read_bytes() + arch.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("HYBRIMOE_CACHE", Path(tempfile.gettempdir()) / "hybrimoe-cuda"))
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"libhm_q4k_gemv_{key}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [nvcc, "-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", "-I", str(inc),
               str(cu), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    so = ctypes.CDLL(str(lib))
    so.hm_q4k_gemv.restype = ctypes.c_int
    so.hm_q4k_gemv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                               ctypes.c_int, ctypes.c_void_p]
    return so


def cuda_q4k_gemv(w_raw: torch.Tensor, x: torch.Tensor, n_rows: int, n_cols: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """y = W @ x with W Q4_K blocks, by the plain CUDA kernel kernels/cuda/q4k_gemv.cu (compiled
    with nvcc on first use, cached in $HYBRIMOE_CACHE or the temp dir). A benchmark second opinion.

    w_raw: uint8 CUDA, n_rows * row_bytes(Q4_K, n_cols) bytes, contiguous, 16-byte aligned
    x:     (n_cols,) float32 CUDA contiguous, 16-byte aligned; returns (n_rows,) float32
    """
    rb = row_bytes(12, n_cols, "cuda_q4k_gemv")
    if w_raw.dtype != torch.uint8 or w_raw.numel() != n_rows * rb or not w_raw.is_contiguous() \
            or not w_raw.is_cuda or w_raw.data_ptr() % 16:
        raise KernelInputError(f"cuda_q4k_gemv: w_raw must be a contiguous 16-byte aligned CUDA uint8 "
                               f"tensor of {n_rows * rb} bytes, found {w_raw.dtype} {tuple(w_raw.shape)} "
                               f"on {w_raw.device}")
    if x.shape != (n_cols,) or x.dtype != torch.float32 or not x.is_contiguous() or x.device != w_raw.device:
        raise KernelInputError(f"cuda_q4k_gemv: x must be ({n_cols},) float32 contiguous on "
                               f"{w_raw.device}, found {x.dtype} {tuple(x.shape)} on {x.device}")
    if out is None:
        out = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    so = _cuda_gemv_lib()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    err = so.hm_q4k_gemv(w_raw.data_ptr(), x.data_ptr(), out.data_ptr(), n_rows, n_cols, stream)
    if err:
        raise RuntimeError(f"hm_q4k_gemv failed: cudaError {err}")
    return out
