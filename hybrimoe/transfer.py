"""GPU slot arenas and the copies that fill them.

Each pool (one per MoE layer with a per-layer capacity, or one shared by all layers with a byte
budget) is one uint8 tensor (n_slots, slot_bytes) allocated once at start; a slot holds one
expert laid out as [gate | up | down] (hybrimoe/layout.py). A load copies the expert's
contiguous span from the pinned host arena (ExpertStore.pack) into a slot: one DMA, no
allocation per transfer.

Streams and events (CUDA): demand loads go on a high-priority copy stream, prefetches on a
low-priority one; each slot has the event of its last copy, so the compute stream waits only for
the slots it reads (`wait_slots`), and a copy into a slot waits for the last kernel that read it
(`mark_read`), so eviction never races a running kernel. Prefetches are issued after the current
layer's demand loads and only into the PCIe idle time the prefetcher budgets, so they do not
queue in front of a demand load of their own layer. (A copy engine does not preempt a DMA
already running; the budget is what keeps prefetch out of demand's way.)

Without CUDA the arenas live in host memory and a load is a memcpy: the cache, scheduler and
slot addressing run exactly as on the GPU (the emulated GPU of the tests).
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TransferStats:
    demand_loads: int = 0
    prefetch_loads: int = 0
    bytes: int = 0
    seconds_issued: float = 0.0  # host time spent issuing copies (not the DMA time on CUDA)


class TransferEngine:
    """pools: list of (n_slots, slot_bytes); device: torch.device of the arenas."""

    def __init__(self, pools: list[tuple[int, int]], device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.arenas = [torch.empty((max(n, 0), b), dtype=torch.uint8, device=self.device) for n, b in pools]
        self.stats = TransferStats()
        if self.cuda:
            lo, hi = torch.cuda.Stream.priority_range()  # numerically lower = higher priority
            self.demand_stream = torch.cuda.Stream(self.device, priority=hi)
            self.prefetch_stream = torch.cuda.Stream(self.device, priority=lo)
            self._copy_done = [[None] * n for n, _ in pools]
            self._read_done = [[None] * n for n, _ in pools]
            # the arenas come from the current stream's pool but the copy streams write them: the
            # caching allocator must not hand their memory out again before those copies finish
            for a in self.arenas:
                a.record_stream(self.demand_stream)
                a.record_stream(self.prefetch_stream)
            self._t_ref = None  # (CUDA event, host perf_counter) pairing event times with host time
        self.events: list[tuple] = []  # (kind, pool, slot, nbytes, start_evt/time, end_evt/time)
        self._pending: deque = deque()  # queued prefetch chunks: (pool, slot, src, offset, last)
        self.record = False

    chunk_bytes = 1 << 20  # prefetch granularity: a demand load queues behind at most the chunks pumped

    def _copy(self, pool: int, slot: int, src: torch.Tensor, off: int, prefetch: bool, last: bool) -> None:
        """Issue one copy of `src` into bytes [off, off + n) of a slot; `last` closes the slot's load."""
        n = src.numel()
        dst = self.arenas[pool][slot, off:off + n]
        t0 = time.perf_counter()
        kind = "prefetch" if prefetch else "load"
        if self.cuda:
            stream = self.prefetch_stream if prefetch else self.demand_stream
            with torch.cuda.stream(stream):
                if off == 0:  # first bytes of a new load: wait for the slot's last reader and writer
                    for ev in (self._read_done[pool][slot], self._copy_done[pool][slot]):
                        if ev is not None:
                            stream.wait_event(ev)
                start = torch.cuda.Event(enable_timing=True) if self.record else None
                if start is not None:
                    if self._t_ref is None:
                        ref = torch.cuda.Event(enable_timing=True)
                        ref.record(stream)
                        ref.synchronize()
                        self._t_ref = (ref, time.perf_counter())
                    start.record(stream)
                dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event(enable_timing=self.record)
                done.record(stream)
            self._copy_done[pool][slot] = done  # the slot's latest write: later writers and readers wait on it
            if last and prefetch:
                self._inflight = getattr(self, "_inflight", []) + [done]
            if self.record:
                self.events.append((kind, pool, slot, n, start, done))
        else:
            dst.copy_(src)
            if self.record:
                self.events.append((kind, pool, slot, n, t0, time.perf_counter()))
        self.stats.seconds_issued += time.perf_counter() - t0
        self.stats.bytes += n

    def load(self, pool: int, slot: int, src: torch.Tensor, prefetch: bool = False) -> None:
        """Load `src` (uint8 (n,), pinned host) into slot `slot` of pool `pool`.

        A demand load is issued at once, whole. A prefetch is only queued, in chunks of
        `chunk_bytes`; `pump` issues queued chunks into idle link time, and `wait_slots` issues the
        rest of a slot that is needed now. So a demand load never queues behind more prefetch
        traffic than was pumped, and a slot reused before its prefetch finished drops the rest."""
        self._drop_pending(pool, slot)
        if prefetch:
            n = src.numel()
            for off in range(0, n, self.chunk_bytes):
                self._pending.append((pool, slot, src, off, min(off + self.chunk_bytes, n) >= n))
            self.stats.prefetch_loads += 1
        else:
            self._copy(pool, slot, src, 0, False, True)
            self.stats.demand_loads += 1

    def _drop_pending(self, pool: int, slot: int) -> None:
        if any(p[0] == pool and p[1] == slot for p in self._pending):
            self._pending = deque(p for p in self._pending if (p[0], p[1]) != (pool, slot))

    def pump(self, nbytes: float) -> int:
        """Issue queued prefetch chunks worth about `nbytes` (at least one if any is queued and
        nbytes > 0); returns the bytes issued."""
        done = 0
        while self._pending and nbytes > 0 and (done == 0 or done + self.chunk_bytes <= nbytes):
            pool, slot, src, off, last = self._pending.popleft()
            part = src[off:off + self.chunk_bytes]
            self._copy(pool, slot, part, off, True, last)
            done += part.numel()
        return done

    def has_pending(self) -> bool:
        """Are prefetch chunks queued (not yet issued)?"""
        return bool(self._pending)

    def reset_stats(self) -> None:
        """Forget the traffic so far (statistics and recorded events), e.g. after a warm start."""
        self.stats = TransferStats()
        self.events.clear()

    def pending_bytes(self) -> int:
        return sum(min(self.chunk_bytes, p[2].numel() - p[3]) for p in self._pending)

    def prefetches_in_flight(self) -> int:
        """Prefetch copies issued but not finished (always 0 on the host, where copies are synchronous)."""
        if not self.cuda:
            return 0
        self._inflight = [ev for ev in getattr(self, "_inflight", []) if not ev.query()]
        return len(self._inflight)

    def wait_slots(self, pool: int, slots) -> None:
        """Issue any queued prefetch chunks of `slots`, then make the current stream wait for the
        copies into them (on the host the copies are already done)."""
        slots = list(slots)
        want = {(pool, s) for s in slots}
        if any((p[0], p[1]) in want for p in self._pending):
            keep = deque()
            for p in self._pending:
                if (p[0], p[1]) in want:
                    self._copy(p[0], p[1], p[2][p[3]:p[3] + self.chunk_bytes], p[3], True, p[4])
                else:
                    keep.append(p)
            self._pending = keep
        if not self.cuda:
            return
        cur = torch.cuda.current_stream(self.device)
        for s in slots:
            ev = self._copy_done[pool][s]
            if ev is not None:
                cur.wait_event(ev)

    def mark_read(self, pool: int, slots) -> None:
        """Record that the current stream's work reads `slots`: later copies into them wait for it."""
        if not self.cuda:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        for s in slots:
            self._read_done[pool][s] = ev

    def synchronize(self) -> None:
        if self.cuda:
            self.demand_stream.synchronize()
            self.prefetch_stream.synchronize()

    def close(self) -> None:
        """Drop queued prefetch chunks and wait for the copies already issued (call before the
        engine's arenas are released, e.g. between benchmark configurations)."""
        self._pending.clear()
        self.synchronize()

    def event_times(self) -> list[tuple]:
        """Recorded copies (record=True) as (kind, pool, slot, nbytes, start, end) with host
        perf_counter seconds; on CUDA the copy streams are synchronized first and each copy's
        device-side start/end is placed on the host clock through a reference event."""
        if not self.cuda:
            return list(self.events)
        if not self.events:
            return []
        self.synchronize()
        ref, t_host = self._t_ref
        return [(kind, pool, slot, n, t_host + ref.elapsed_time(s) / 1e3, t_host + ref.elapsed_time(e) / 1e3)
                for kind, pool, slot, n, s, e in self.events]


def clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed call made through torch.cuda.cudart()
    (its bindings return the error but leave it set, and the next kernel launch would raise it)."""
    import ctypes

    try:  # torch's own libcudart (already loaded, so found by name)
        ctypes.CDLL(f"libcudart.so.{torch.version.cuda.split('.')[0]}").cudaGetLastError()
        return
    except Exception:
        pass
    try:
        get = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
        if get is not None:
            get()
    except Exception:
        pass


def _unregister(ptr: int) -> None:
    """Undo host_zeros' registration (its memory is freed right after): copies still reading it
    must finish first."""
    try:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
            clear_cuda_error()
    except Exception:  # interpreter shutdown: CUDA may be gone already
        pass


def host_zeros(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """Zeroed uint8 host tensor; pin=True page-locks it for DMA.

    Pinned memory is registered in place (cudaHostRegister on a numpy allocation), not taken from
    torch's pinned-memory allocator, which rounds every request up to a power of two: a 367 MB
    DSv2-Lite layer arena would hold 512 MB of page-locked memory, ~1.4x the model's experts in all.
    The registration is undone when the last view of the memory is gone. If registering fails
    (e.g. a sandbox without it), torch's allocator is used instead."""
    if not pin:
        return torch.zeros(shape, dtype=torch.uint8)
    nd = np.zeros(shape, dtype=np.uint8)
    ptr = nd.ctypes.data
    try:
        ok = int(torch.cuda.cudart().cudaHostRegister(ptr, max(nd.nbytes, 1), 0)) == 0
    except Exception:
        ok = False
    if not ok:
        clear_cuda_error()
        return torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
    # the ndarray outlives every tensor made from it (torch.from_numpy keeps it alive)
    weakref.finalize(nd, _unregister, ptr)
    return torch.from_numpy(nd)


def measure_h2d(nbytes: int, device: torch.device, reps: int = 20) -> dict:
    """Pinned host -> device copy of `nbytes` (expert-sized) vs a plain pageable copy; GB/s each.
    Used by calibration and the layer benchmark."""
    device = torch.device(device)
    src_p = torch.empty(nbytes, dtype=torch.uint8).pin_memory() if device.type == "cuda" else torch.empty(nbytes, dtype=torch.uint8)
    src_u = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, src in (("pinned", src_p), ("pageable", src_u)):
        ts = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=(name == "pinned"))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        med = ts[len(ts) // 2]
        out[name] = {"seconds": med, "gbps": nbytes / med / 1e9}
    return out
