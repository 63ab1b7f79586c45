"""Where a layer's experts run once the decisions are made: one executor per side.

    CpuSide       the host's expert kernels (hybrimoe.cpu, C++ pool, GIL released): host weights,
                  the fused job of a layer's CPU experts, on CUDA the pinned buffer it writes
    gpu_executor  the GPU side the runtime was configured with (RuntimeConfig.gpu):
                    "cuda", "emulated-triton"  TritonGpu: slot table + gpu.moe_forward over the slot
                                               arena (on CUDA, or in Triton's interpreter on a host)
                    "emulated"                 EmulatedGpu: the CPU kernels on views of the host
                                               slot arena (tests: cache, slots and copies run for real)
                    "none"                     None: every routed expert runs on the CPU

Each GPU executor's run(i, x, x_host, ids, w, pairs, slot_of) computes the experts in slot_of
({expert: slot}) for their (token, weight) pairs and returns their summed output (T, H) float32.
"""

from __future__ import annotations

import torch

from . import reference
from .store import expert_views


class _SyncResult:
    def __init__(self, value):
        self._v = value

    def wait(self):
        return self._v


def _cpu_module():
    """hybrimoe.cpu if its extension is built, else None (reference fallback)."""
    try:
        from . import cpu

        return cpu if cpu.available() else None
    except ImportError:
        return None


class CpuSide:
    """The CPU's share of each layer. store: the expert store (host blocks); pinned_out: the
    output goes to a CUDA device (a pinned buffer, copied without a host sync); synchronous: nothing
    runs beside the CPU job (no real or emulated GPU side), so the calling thread runs it."""

    def __init__(self, store, pinned_out: bool, synchronous: bool = False):
        self.store, self.pinned_out, self.synchronous = store, pinned_out, synchronous
        self.cpu = _cpu_module()
        self._views: dict[tuple, tuple] = {}
        # CUDA: pinned buffer of the CPU experts' output, the event of its last copy to the device,
        # and the CPU job writing into it (see out_buffer)
        self._out_buf: torch.Tensor | None = None
        self.out_read = None
        self.out_job = None

    def tier(self) -> str:
        return self.cpu.tier() if self.cpu is not None else "reference (extension not built)"

    def prepared(self, gate, up, down):
        """(gate, up, down), checked once for the CPU kernels when they are built."""
        return self.cpu.PreparedExpert(gate, up, down) if self.cpu is not None else (gate, up, down)

    def host_weights(self, layer: int, e: int):
        """The expert's host blocks (views into the store's pinned arena), memoised per expert."""
        key = ("host", layer, e)
        w = self._views.get(key)
        if w is None:
            v = self.store.expert(layer, e)
            w = self._views[key] = self.prepared(v.gate, v.up, v.down)
        return w

    def slot_weights(self, arena: torch.Tensor, layout, key) -> tuple:
        """Prepared views of an expert in a host slot arena (the emulated GPU reads these),
        memoised by `key`: the arenas never move, so a slot's view stays valid."""
        w = self._views.get(key)
        if w is None:
            v = expert_views(arena.numpy(), layout)
            w = self._views[key] = self.prepared(v.gate, v.up, v.down)
        return w

    def submit(self, x: torch.Tensor, experts, toks, ws, out: torch.Tensor | None = None):
        """Fused FFN over (experts, token lists, weights) on the CPU pool, accumulated into `out`
        (zeros when None); reference fallback. Returns a handle: wait() -> out (None if no experts)."""
        if not experts:
            return _SyncResult(None)
        if self.cpu is not None:
            if self.synchronous:
                # Nothing runs beside the job on a host without a (real or emulated) GPU: the calling
                # thread runs it (GIL released), as one of the pool's threads. Queued on the driver
                # thread instead, the job's threads and the waiting Python thread were one more
                # than the cores of a 2-core box, and the submit itself stalled until the job ended.
                return _SyncResult(self.cpu.moe_ffn(x, experts, toks, ws, out=out))
            return self.cpu.moe_ffn_submit(x, experts, toks, ws, out=out)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32) if out is None else out
        for (g, u, d), t, w in zip(experts, toks, ws):
            t = torch.as_tensor(t, dtype=torch.long)
            y = reference.expert_ffn(x[t], *(torch.from_numpy(q.dequantize()) for q in (g, u, d)))
            out.index_add_(0, t, torch.as_tensor(w, dtype=torch.float32)[:, None] * y)
        return _SyncResult(out)

    def submit_one_token(self, layer: int, x: torch.Tensor, experts, weights, extra=None):
        """The one-token job of a host-only step, built without the per-call checks of
        hybrimoe.cpu.moe_ffn: x (1, H) float32 contiguous; experts ascending (the job's order, as
        the plan gives it at one token), weights float32 in the same order; extra: (PreparedExpert,
        (1,) weight) appended last. The rows come from a per-layer table of the experts' checked
        pointers (the PreparedExpert of each, made once); only the weight pointers change per call.
        Returns a handle like submit, or None where this path does not apply (no extension)."""
        if self.cpu is None or not self.synchronous or x.dtype != torch.float32 or not x.is_contiguous():
            return None
        import numpy as np

        tab = self._views.get(("table", layer))
        if tab is None:
            n = self.store.config.n_experts
            tab = np.zeros((n, 11), np.int64)
            self._one_tok = getattr(self, "_one_tok", None)
            if self._one_tok is None:
                self._one_tok = np.zeros(1, np.int64)  # token 0, for every expert of a one-token job
            for e in range(n):
                tab[e, :7] = self.host_weights(layer, e).ptrs
            tab[:, 7] = self._one_tok.ctypes.data
            tab[:, 8] = 1  # n_tok
            tab[:, 9] = 1  # tok64
            self._views[("table", layer)] = tab
        k = len(experts)
        rows = np.empty((k + (extra is not None), 11), np.int64)
        rows[:k] = tab[experts]
        wbuf = np.empty(len(rows), np.float32)
        wbuf[:k] = weights
        if extra is not None:
            px = extra[0]
            if px.hidden != x.shape[1]:
                return None
            rows[k, :7] = px.ptrs
            rows[k, 7:10] = (self._one_tok.ctypes.data, 1, 1)
            wbuf[k] = float(np.asarray(extra[1]).reshape(-1)[0])
        rows[:, 10] = wbuf.ctypes.data + 4 * np.arange(len(rows), dtype=np.int64)
        desc = rows.view(self.cpu.JOB_EXPERT_DTYPE).reshape(len(rows))
        out = torch.zeros(1, x.shape[1], dtype=torch.float32)
        self.cpu.moe_ffn_table(x, desc, out)
        del wbuf, rows  # alive until the call returned
        return _SyncResult(out)

    def out_buffer(self, T: int, H: int) -> torch.Tensor:
        """Zeroed pinned (T, H) float32 buffer for the CPU experts' output on CUDA: moe_end copies it
        to the device without a host sync. One buffer (grown by doubling) serves every layer; before
        it is rewritten, the last copy out of it must have finished (an event, normally long done)."""
        job = self.out_job
        if job is not None:  # a layer call that raised before moe_end may have left its job running
            self.out_job = None
            try:
                job.wait()
            except Exception:  # noqa: BLE001 - that call already failed; its job's error goes with it
                pass
        buf = self._out_buf
        if buf is None or buf.shape[0] < T:
            if buf is not None:
                self.out_read.synchronize()
            n = max(T, 2 * buf.shape[0] if buf is not None else 1)
            buf = self._out_buf = torch.empty(n, H, dtype=torch.float32).pin_memory()
            self.out_read = torch.cuda.Event()
        else:
            self.out_read.synchronize()
        out = buf[:T]
        out.zero_()
        return out


class EmulatedGpu:
    """The GPU side on a host: the CPU kernels on views of the host slot arenas."""

    def __init__(self, transfers, layouts, pool_of, cpu_side: CpuSide):
        self.transfers, self.layouts, self.pool_of, self.cpu_side = transfers, layouts, pool_of, cpu_side

    def run(self, i, x, x_host, ids, w, pairs, slot_of) -> torch.Tensor:
        pool = self.pool_of(i)
        self.transfers.wait_slots(pool, slot_of.values())  # queued prefetch chunks of these slots
        g_ex, g_tok, g_w = [], [], []
        arena = self.transfers.arenas[pool]
        for e, s in slot_of.items():
            tok, wt = pairs.of(e)
            g_ex.append(self.cpu_side.slot_weights(arena[s], self.layouts[i], ("slot", i, s)))
            g_tok.append(tok)
            g_w.append(wt)
        return self.cpu_side.submit(x_host, g_ex, g_tok, g_w).wait()


class TritonGpu:
    """The real GPU path: an (E,) expert -> slot table and gpu.moe_forward over the slot arena
    (on CUDA; or in Triton's interpreter over host arenas, tests only)."""

    def __init__(self, transfers, layouts, pool_of, n_experts: int, device: torch.device):
        self.transfers, self.layouts, self.pool_of = transfers, layouts, pool_of
        self.n_experts, self.device = n_experts, device
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def slot_table(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pinned host, device) int32 (E,) expert -> slot tables of MoE layer i, allocated once.
        Rewriting the host table at the next step is safe: its last copy was issued on the
        current stream before the device->host routing copies (syncs) of every layer since."""
        t = self._tables.get(i)
        if t is None:
            host = torch.empty(self.n_experts, dtype=torch.int32)
            t = self._tables[i] = (host.pin_memory() if self.device.type == "cuda" else host,
                                   torch.empty(self.n_experts, dtype=torch.int32, device=self.device))
        return t

    def run(self, i, x, x_host, ids, w, pairs, slot_of) -> torch.Tensor:
        from . import gpu

        pool = self.pool_of(i)
        sl_host, sl_dev = self.slot_table(i)
        sl_np = sl_host.numpy()
        sl_np[:] = -1
        sl_np[list(slot_of)] = list(slot_of.values())
        sl_dev.copy_(sl_host, non_blocking=True)  # pinned: no host sync
        self.transfers.wait_slots(pool, slot_of.values())
        xd = x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()
        y = gpu.moe_forward(xd.contiguous(), ids.to(self.device).contiguous(),
                            w.to(self.device, torch.float32).contiguous(), sl_dev,
                            self.transfers.arenas[pool], self.layouts[i])
        self.transfers.mark_read(pool, slot_of.values())
        return y


def gpu_executor(side: str, transfers, layouts, pool_of, n_experts: int, device: torch.device, cpu_side: CpuSide):
    """The executor of GPU side `side` (module docstring), or None for "none"."""
    if side == "none":
        return None
    if side == "emulated":
        return EmulatedGpu(transfers, layouts, pool_of, cpu_side)
    return TritonGpu(transfers, layouts, pool_of, n_experts, device)


__all__ = ["CpuSide", "EmulatedGpu", "TritonGpu", "gpu_executor"]
