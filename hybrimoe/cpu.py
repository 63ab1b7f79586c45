"""CPU expert kernels on raw GGUF blocks (the native extension `hybrimoe._cpu`).

    x (T, H) f32/bf16 -> [quantize activations per token] -> row kernels of the active tier
    -> persistent thread pool -> out (T, rows) f32, or the fused expert FFN of a whole layer.

Tiers, chosen at run time from CPUID (`tier()`, `set_tier()`):
    ref      dequantize a row to float and dot with float activations (plain C++, slow, exact)
    generic  int8 activations + integer block dots; AVX2/FMA where present, else portable C++
    avx512   the same with AVX-512 BW/VL (+VNNI where present); the default where available
The integer tiers quantize each token's activations on the fly (per 256 for Q4_K/Q6_K weights,
per 32 for Q5_0/Q8_0), as llama.cpp does: the only numerical difference from `ref`, a relative
output error of about 0.5% rms (see tests/test_cpu_kernels.py for the bound).

The extension is imported lazily (on the first call), never at import of this module.
`available()` says whether it is built. Inputs are validated here, before any work, and a bad
one raises KernelInputError naming the argument, the expected and the found value.

Readable twins: `gemm_ref`, `moe_ffn_ref` (numpy/torch on dequantized weights).
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import numpy as np

from . import formats
from .errors import KernelInputError, _fmt

try:  # torch is a dependency, but keep the numpy path usable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None

_EXT = None
_EXT_ERR: Exception | None = None

# One routed expert of a fused CPU job, as the extension reads it: struct JobExpert in
# kernels/cpu/job.h (same names, same order, static_assert on its 88 bytes).
JOB_EXPERT_FIELDS = ("gate", "gate_type", "up", "up_type", "down", "down_type", "inter", "tok", "n_tok", "tok64",
                     "wts")
JOB_EXPERT_DTYPE = np.dtype([(f, np.int64) for f in JOB_EXPERT_FIELDS])
assert JOB_EXPERT_DTYPE.itemsize == 88


def _ext():
    """The native module, imported on first use."""
    global _EXT, _EXT_ERR
    if _EXT is None:
        if _EXT_ERR is not None:
            raise ImportError(_EXT_ERR_MSG) from _EXT_ERR
        try:
            _EXT = importlib.import_module("hybrimoe._cpu")
        except ImportError as e:
            _EXT_ERR = e
            raise ImportError(_EXT_ERR_MSG) from e
    return _EXT


_EXT_ERR_MSG = (
    "hybrimoe._cpu (the CPU kernel extension) is not built or cannot be loaded: "
    "build it with `pip install --no-build-isolation -e .` from the repository root"
)


def available() -> bool:
    """True when the native extension can be imported."""
    try:
        _ext()
        return True
    except ImportError:
        return False


def tier() -> str:
    """Active tier: 'ref', 'generic' or 'avx512'."""
    return _ext().tier()


def available_tiers() -> list[str]:
    """Tiers this CPU can run, slowest first."""
    return list(_ext().available_tiers())


def set_tier(name: str) -> None:
    """Force a tier for later calls (ValueError if this CPU cannot run it). The environment
    variable HYBRIMOE_CPU_TIER sets the initial tier."""
    _ext().set_tier(name)


def set_num_threads(n: int) -> None:
    """Size of the persistent pool (the calling/driver thread counts as one)."""
    _ext().set_num_threads(int(n))


def num_threads() -> int:
    """Current pool size; defaults to the physical cores available to this process."""
    return _ext().num_threads()


def physical_cores() -> int:
    """Physical cores available to this process (the pool's default size)."""
    return _ext().physical_cores()


# ------------------------------------------------------------------------------ input checks ---


def _ptr(a: np.ndarray) -> int:
    """Address of a numpy array's first element (cheaper than _ptr(a), which builds a
    ctypes object: ~1 us a call, several per kernel call)."""
    return a.__array_interface__["data"][0]


def _is_torch(a) -> bool:
    return torch is not None and isinstance(a, torch.Tensor)


def _activations(x, name: str):
    """-> (holder, ptr, is_bf16, T, H, was_torch, was_1d). x: (T, H) or (H,), float32 or bf16
    (torch), CPU. Non-contiguous input is copied."""
    if _is_torch(x):
        if x.device.type != "cpu":
            raise KernelInputError(_fmt(name, "must be a CPU tensor", "cpu", x.device))
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise KernelInputError(_fmt(name, "has the wrong dtype", "float32 or bfloat16", x.dtype))
        one = x.dim() == 1
        if x.dim() not in (1, 2):
            raise KernelInputError(_fmt(name, "must be (T, H) or (H,)", "2-D", f"shape {tuple(x.shape)}"))
        x = x.reshape(1, -1) if one else x
        x = x.contiguous()
        return x, x.data_ptr(), x.dtype == torch.bfloat16, x.shape[0], x.shape[1], True, one
    a = np.asarray(x)
    if a.dtype != np.float32:
        raise KernelInputError(_fmt(name, "has the wrong dtype", "float32 (or a torch bfloat16 tensor)", a.dtype))
    if a.ndim not in (1, 2):
        raise KernelInputError(_fmt(name, "must be (T, H) or (H,)", "2-D", f"shape {a.shape}"))
    one = a.ndim == 1
    a = np.ascontiguousarray(a.reshape(1, -1) if one else a)
    return a, _ptr(a), False, a.shape[0], a.shape[1], False, one


def _weight(qt, name: str, rows: int | None, cols: int | None):
    """-> (holder, ptr, qtype, (rows, cols)) of a QuantTensor-like object (data, qtype, shape)."""
    for attr in ("data", "qtype", "shape"):
        if not hasattr(qt, attr):
            raise KernelInputError(_fmt(name, f"is not a QuantTensor (no .{attr})", "QuantTensor", type(qt).__name__))
    qtype = int(qt.qtype)
    if qtype not in formats.EXPERT_QTYPES:
        raise KernelInputError(
            _fmt(name, "has an unsupported quant type", [formats.qtype_name(t) for t in formats.EXPERT_QTYPES],
                 formats.qtype_name(qtype))
        )
    r, c = (int(v) for v in qt.shape)
    if (rows is not None and r != rows) or (cols is not None and c != cols):
        raise KernelInputError(_fmt(name, "has the wrong shape", (rows if rows is not None else r,
                                                                  cols if cols is not None else c), (r, c)))
    if c % formats.block_elems(qtype):
        raise KernelInputError(
            _fmt(name, f"row length is not a multiple of {formats.qtype_name(qtype)}'s block",
                 f"a multiple of {formats.block_elems(qtype)}", c)
        )
    rb = formats.row_bytes(qtype, c)
    d = qt.data
    if _is_torch(d):
        if d.device.type != "cpu" or d.dtype != torch.uint8 or tuple(d.shape) != (r, rb) or not d.is_contiguous():
            raise KernelInputError(_fmt(f"{name}.data", "must be contiguous CPU uint8 raw blocks",
                                        f"uint8 {(r, rb)} contiguous", f"{d.dtype} {tuple(d.shape)} on {d.device}"))
        return d, d.data_ptr(), qtype, (r, c)
    d = np.asarray(d)
    if d.dtype != np.uint8 or d.shape != (r, rb) or not d.flags.c_contiguous:
        raise KernelInputError(_fmt(f"{name}.data", "must be C-contiguous uint8 raw blocks",
                                    f"uint8 {(r, rb)} contiguous", f"{d.dtype} {d.shape}"))
    return d, _ptr(d), qtype, (r, c)


_INT_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_F32 = np.dtype(np.float32)


def _vector(v, name: str, kind: str):
    """1-D token ids (kind 'int': int32/int64 kept) or routing weights (kind 'float': -> float32)."""
    if type(v) is np.ndarray and v.ndim == 1 and v.flags.c_contiguous and (
            v.dtype in _INT_DTYPES if kind == "int" else v.dtype == _F32):
        return v  # already what the kernels take (the runtime's own lists): no checks to run
    if _is_torch(v):
        if v.device.type != "cpu":
            raise KernelInputError(_fmt(name, "must be on the CPU", "cpu", v.device))
        v = v.detach().numpy()
    a = np.asarray(v)
    if a.ndim != 1:
        raise KernelInputError(_fmt(name, "must be 1-D", "1-D", f"shape {a.shape}"))
    if kind == "int":
        if a.dtype not in (np.int32, np.int64):
            if a.size == 0 or np.issubdtype(a.dtype, np.integer):
                a = a.astype(np.int64)
            else:
                raise KernelInputError(_fmt(name, "has the wrong dtype", "int32 or int64", a.dtype))
        return np.ascontiguousarray(a)
    if a.dtype != np.float32 and not (np.issubdtype(a.dtype, np.floating) or a.size == 0):
        raise KernelInputError(_fmt(name, "has the wrong dtype", "float", a.dtype))
    return np.ascontiguousarray(a, dtype=np.float32)


def _empty_like_kind(was_torch: bool, shape, zero: bool = True):
    if was_torch:
        t = (torch.zeros if zero else torch.empty)(shape, dtype=torch.float32)
        return t, t.data_ptr()
    a = (np.zeros if zero else np.empty)(shape, dtype=np.float32)
    return a, _ptr(a)


def _out(out, was_torch: bool, shape, name="out", zero: bool = True):
    """(holder, pointer) of the output: `out` checked, or a new array (zeroed when `zero`: the
    kernel accumulates into it)."""
    if out is None:
        return _empty_like_kind(was_torch, shape, zero)
    if _is_torch(out):
        if out.device.type != "cpu" or out.dtype != torch.float32 or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
            raise KernelInputError(_fmt(name, "must be a contiguous CPU float32 tensor", f"float32 {tuple(shape)}",
                                        f"{out.dtype} {tuple(out.shape)} on {out.device}"))
        return out, out.data_ptr()
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != tuple(shape) or not out.flags.c_contiguous:
        found = f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
        raise KernelInputError(_fmt(name, "must be a C-contiguous float32 array", f"float32 {tuple(shape)}", found))
    if not out.flags.writeable:
        raise KernelInputError(_fmt(name, "is read-only", "writeable", "read-only"))
    return out, _ptr(out)


# ------------------------------------------------------------------------------------ GEMM ---


class PreparedWeight:
    """A QuantTensor checked once for `gemm` (its pointer, type and shape), for a weight used on
    every call (QuantLinear): the per-call checks cost more than a small GEMV's arithmetic."""

    __slots__ = ("qt", "_w")

    def __init__(self, qt, name: str = "qt"):
        self.qt = qt
        self._w = _weight(qt, name, None, None)


def gemm(qt, x, out=None):
    """y = x @ W.T for a quantized weight W.

    qt:  QuantTensor (rows, cols): raw GGUF blocks, C-contiguous uint8 (rows, row_bytes); or a
         PreparedWeight of one
    x:   (T, cols) float32 (numpy or torch) or bfloat16 (torch), CPU; (cols,) for one token
    out: optional (T, rows) float32, overwritten
    Returns (T, rows) float32 ((rows,) for 1-D x), torch if x is torch else numpy.
    T == 1 is the GEMV path, small T a token-tiled GEMM, large T the blocked prefill path (the
    same row kernels: each weight row chunk stays in L2 for every tile of tokens).
    """
    xh, xp, bf16, T, H, was_torch, one = _activations(x, "x")
    wh, wp, qtype, (rows, cols) = qt._w if isinstance(qt, PreparedWeight) else _weight(qt, "qt", None, None)
    if H != cols:
        raise KernelInputError(_fmt("x", "last dimension must equal the weight's columns", cols, H))
    oh, op = _out(out, was_torch, (T, rows), zero=False)
    _ext().gemm(wp, qtype, rows, cols, xp, bf16, T, op)
    del xh, wh  # kept alive until here
    return oh[0] if one else oh


def gemm_ref(qt, x) -> np.ndarray:
    """Readable twin of `gemm`: float64 x @ dequantize(W).T, as float32 (T, rows) numpy."""
    w = formats.dequantize(np.asarray(qt.data), qt.qtype, qt.shape).astype(np.float64)
    xx = x.float().numpy() if _is_torch(x) else np.asarray(x)
    return (np.atleast_2d(xx).astype(np.float64) @ w.T).astype(np.float32)


# --------------------------------------------------------------------------------- MoE FFN ---


class PreparedExpert:
    """One expert's (gate, up, down) QuantTensors, checked once: the native call's pointers and
    types without re-validating the weights on every call (the runtime memoises one per expert or
    slot). Iterates as the (gate, up, down) triple, so it goes wherever a triple does."""

    __slots__ = ("weights", "hidden", "inter", "ptrs", "_keep")

    def __init__(self, gate, up, down, name: str = "expert"):
        gh, gp, gt, (inter, hidden) = _weight(gate, f"{name}.gate", None, None)
        uh, up_, ut, _ = _weight(up, f"{name}.up", inter, hidden)
        dh, dp, dt, _ = _weight(down, f"{name}.down", hidden, inter)
        self.weights, self.hidden, self.inter = (gate, up, down), hidden, inter
        self.ptrs = (gp, gt, up_, ut, dp, dt, inter)
        self._keep = (gh, uh, dh)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return 3


def _moe_prepare(x, experts, token_ids, weights, out):
    xh, xp, bf16, T, H, was_torch, one = _activations(x, "x")
    if one:
        raise KernelInputError(_fmt("x", "must be 2-D", "(T, H)", f"shape {(H,)}"))
    E = len(experts)
    if len(token_ids) != E or len(weights) != E:
        raise KernelInputError(
            _fmt("token_ids/weights", "need one entry per expert", E, f"{len(token_ids)} / {len(weights)}")
        )
    rows = []  # one descriptor row per expert; one array at the end (row-wise numpy stores cost more)
    keep: list[Any] = [xh]
    for e, (ex, tok, wt) in enumerate(zip(experts, token_ids, weights)):
        if not isinstance(ex, PreparedExpert):
            if len(ex) != 3:
                raise KernelInputError(_fmt(f"experts[{e}]", "must be (gate, up, down)", 3, len(ex)))
            ex = PreparedExpert(*ex, name=f"experts[{e}]")
        if ex.hidden != H:
            raise KernelInputError(_fmt(f"experts[{e}].gate", "has the wrong shape", (ex.inter, H),
                                        (ex.inter, ex.hidden)))
        tk = _vector(tok, f"token_ids[{e}]", "int")
        w = _vector(wt, f"weights[{e}]", "float")
        if w.shape != tk.shape:
            raise KernelInputError(_fmt(f"weights[{e}]", "must have one weight per token id", tk.shape, w.shape))
        rows.append((*ex.ptrs, _ptr(tk), tk.size, tk.dtype == np.int64, _ptr(w)))
        keep += [ex, tk, w]
    # rows built as plain tuples (JobExpert field order) and converted once
    desc = np.array(rows, dtype=np.int64).reshape(E, len(JOB_EXPERT_FIELDS)).view(JOB_EXPERT_DTYPE).reshape(E)
    oh, op = _out(out, was_torch, (T, H))
    return (xp, bf16, T, H, op, desc), oh, keep


def moe_ffn(x, experts: Sequence, token_ids: Sequence, weights: Sequence, out=None):
    """Fused routed-expert FFN of one layer, all experts in one native call.

    x:         (T, H) float32 (numpy/torch) or bfloat16 (torch), CPU
    experts:   list of (gate, up, down) QuantTensors: gate/up (I_e, H), down (H, I_e); types may
               differ per matrix (e.g. Q4_K gate/up with Q5_0 or Q6_K down)
    token_ids: per expert, 1-D int32/int64 indices into x's rows (may be empty)
    weights:   per expert, 1-D float routing weights, one per token id
    out:       optional (T, H) float32, ACCUMULATED into (out[t] += ...); a zeroed array is made
               when None
    Returns out: out[t] += w * down(silu(gate(x[t])) * up(x[t])) for every (expert, token) pair.
    The sum over experts is in a fixed order (deterministic for any thread count).
    """
    args, oh, keep = _moe_prepare(x, experts, token_ids, weights, out)
    _ext().moe_ffn(*args)
    del keep
    return oh


def moe_ffn_table(x, desc: np.ndarray, out):
    """`moe_ffn` on a job the caller built itself: desc, a C-contiguous JOB_EXPERT_DTYPE array whose
    pointers (weights from PreparedExpert.ptrs, token ids int64, routing weights float32) the caller
    checked and keeps alive for the call; x (T, H) float32 contiguous CPU tensor; out (T, H) float32
    contiguous, accumulated into. The runtime's one-token host step uses it (the per-call checks of
    moe_ffn cost more than a decode job's bookkeeping should); token ids are still range-checked in
    the job."""
    if not (_is_torch(x) and x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()):
        raise KernelInputError(_fmt("x", "must be a contiguous (T, H) float32 tensor", "float32 (T, H)",
                                    f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"))
    if desc.dtype != JOB_EXPERT_DTYPE or desc.ndim != 1 or not desc.flags.c_contiguous:
        raise KernelInputError(_fmt("desc", "must be a 1-D C-contiguous JOB_EXPERT_DTYPE array", "JOB_EXPERT_DTYPE",
                                    f"{desc.dtype} {desc.shape}"))
    _, op = _out(out, True, tuple(x.shape))
    _ext().moe_ffn(x.data_ptr(), False, x.shape[0], x.shape[1], op, desc)
    return out


class MoEHandle:
    """Result of `moe_ffn_submit`. wait() blocks (GIL released) until the job is done and returns
    the output, or raises the error the job hit (e.g. a token id out of range)."""

    def __init__(self, h):
        self._h = h

    def wait(self):
        return self._h.wait()[0]

    def done(self) -> bool:
        return self._h.done()


def moe_ffn_submit(x, experts: Sequence, token_ids: Sequence, weights: Sequence, out=None) -> MoEHandle:
    """`moe_ffn` queued on the pool's driver thread; returns a handle at once. Inputs are checked
    here (KernelInputError) before queuing; token-id ranges are checked in the job (at wait()).
    Jobs run one at a time, in submission order, and never interleave with synchronous calls.
    Do not modify x, the weights or out until wait() returns."""
    args, oh, keep = _moe_prepare(x, experts, token_ids, weights, out)
    return MoEHandle(_ext().moe_ffn_submit(*args, (oh, keep)))


def moe_ffn_ref(x, experts, token_ids, weights) -> "torch.Tensor":
    """Readable twin of `moe_ffn` on dequantized weights (hybrimoe.reference.expert_ffn),
    float32 math; returns (T, H) float32 torch."""
    from .reference import expert_ffn

    xt = x if _is_torch(x) else torch.from_numpy(np.asarray(x))
    out = torch.zeros(xt.shape, dtype=torch.float32)
    for (g, u, d), tok, w in zip(experts, token_ids, weights):
        tok = torch.as_tensor(np.asarray(tok), dtype=torch.long)
        if tok.numel() == 0:
            continue
        deq = [torch.from_numpy(formats.dequantize(np.asarray(m.data), m.qtype, m.shape)) for m in (g, u, d)]
        wt = torch.as_tensor(np.asarray(w, dtype=np.float32))
        out.index_add_(0, tok, wt[:, None] * expert_ffn(xt[tok], *deq))
    return out


# ------------------------------------------------------------- decode-step helpers (float32) ---


def _f32_rows(t, name: str) -> None:
    if not _is_torch(t) or t.dtype != torch.float32 or t.device.type != "cpu":
        raise KernelInputError(_fmt(name, "must be a float32 CPU torch tensor", "float32 on cpu",
                                    f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '?')}"))
    if t.numel() and t.stride(-1) != 1:
        raise KernelInputError(_fmt(name, "needs a contiguous last dimension", "stride 1", t.stride(-1)))


def attend_one(query, key, value, scale: float, mask=None):
    """One-token attention on the pool, reading K/V where they lie (any strides but the last):

        query (B, H, 1, dk), key (B, Hkv, S, dk), value (B, Hkv, S, dv): float32 CPU tensors
        mask: None or additive float32 (B, 1 | H, 1, S) (-inf where masked)
        -> (B, H, 1, dv) float32 = softmax(scale * q k^T + mask) v, grouped heads (H % Hkv == 0)
           read without repeating K/V; a query whose every score is masked gives zeros.

    The float32 twin is torch's matmul -> softmax -> matmul (tests/test_cpu_attention.py)."""
    for t, n in ((query, "query"), (key, "key"), (value, "value")):
        _f32_rows(t, n)
        if t.dim() != 4:
            raise KernelInputError(_fmt(n, "must be 4-D", "(B, heads, S, d)", tuple(t.shape)))
    B, H, q1, dk = query.shape
    _, Hkv, S, dk2 = key.shape
    dv = value.shape[3]
    if q1 != 1:
        raise KernelInputError(_fmt("query", "must hold one position", 1, q1))
    if key.shape[0] != B or dk2 != dk or H % max(Hkv, 1) or Hkv < 1 or S < 1:
        raise KernelInputError(_fmt("key", "does not fit the query", f"({B}, a divisor of {H}, S >= 1, {dk})",
                                    tuple(key.shape)))
    if tuple(value.shape[:3]) != (B, Hkv, S):
        raise KernelInputError(_fmt("value", "does not fit the key", (B, Hkv, S, "dv"), tuple(value.shape)))
    mp, mb, mh = 0, 0, 0
    if mask is not None:
        _f32_rows(mask, "mask")
        if mask.dim() != 4 or mask.shape[0] != B or mask.shape[1] not in (1, H) or mask.shape[2] != 1 \
                or mask.shape[3] != S:
            raise KernelInputError(_fmt("mask", "has the wrong shape", f"({B}, 1 or {H}, 1, {S})", tuple(mask.shape)))
        mp, mb, mh = mask.data_ptr(), mask.stride(0), (mask.stride(1) if mask.shape[1] == H else 0)
    out = torch.empty(B, H, 1, dv, dtype=torch.float32)
    _ext().attend_one(query.data_ptr(), query.stride(0), query.stride(1),
                      key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
                      value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
                      mp, mb, mh, B, H, Hkv, S, dk, dv, float(scale), out.data_ptr())
    return out


def rms_norm(x, weight, eps: float):
    """x (..., n) float32 CPU tensor, weight (n,) float32 -> x * rsqrt(mean(x^2, -1) + eps) * weight,
    as transformers' RMSNorm modules compute a float32 input (float32 throughout; the mean's
    summation order differs from torch's, within float32 rounding)."""
    _f32_rows(x, "x")
    _f32_rows(weight, "weight")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise KernelInputError(_fmt("weight", "must be (n,) for x's last dimension", (n,), tuple(weight.shape)))
    xc = x.contiguous()
    y = torch.empty_like(xc)
    _ext().rms_norm(xc.data_ptr(), weight.contiguous().data_ptr(), xc.numel() // n if n else 0, n, float(eps),
                    y.data_ptr())
    return y
