"""TransferEngine on the host (the emulated GPU): demand loads at once, prefetches in chunks that
move only when pumped or needed, and a slot reused mid-prefetch never gets stale bytes."""

import pytest
import torch

from hybrimoe.transfer import TransferEngine


def _src(n, seed):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_demand_load_is_immediate():
    te = TransferEngine([(2, 10_000)], torch.device("cpu"))
    src = _src(9_000, 0)
    te.load(0, 1, src)
    assert torch.equal(te.arenas[0][1, :9_000], src)
    assert te.stats.demand_loads == 1 and te.stats.bytes == 9_000


def test_prefetch_moves_only_when_pumped_or_needed():
    te = TransferEngine([(2, 10_000)], torch.device("cpu"))
    te.chunk_bytes = 1_000
    te.arenas[0].zero_()
    src = _src(9_500, 1)  # 10 chunks, the last one short
    te.load(0, 0, src, prefetch=True)
    assert te.stats.bytes == 0 and te.pending_bytes() == 9_500
    assert te.pump(2_500) == 2_000  # whole chunks within the budget
    assert torch.equal(te.arenas[0][0, :2_000], src[:2_000])
    assert int(te.arenas[0][0, 2_000:].count_nonzero()) == 0
    assert te.pump(1) == 1_000  # a positive budget always moves one chunk
    te.wait_slots(0, [0])  # needed now: the rest is issued
    assert torch.equal(te.arenas[0][0, :9_500], src) and te.pending_bytes() == 0


def test_slot_reused_before_prefetch_finished():
    te = TransferEngine([(1, 10_000)], torch.device("cpu"))
    te.chunk_bytes = 1_000
    old, new = _src(8_000, 2), _src(8_000, 3)
    te.load(0, 0, old, prefetch=True)
    te.pump(3_000)
    te.load(0, 0, new)  # demand load into the same slot: the queued rest of `old` is dropped
    assert te.pending_bytes() == 0
    te.pump(10_000)
    te.wait_slots(0, [0])
    assert torch.equal(te.arenas[0][0, :8_000], new)


@pytest.mark.gpu
def test_cuda_chunked_prefetch_then_read():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    te = TransferEngine([(2, 1 << 20)], torch.device("cuda"))
    te.chunk_bytes = 64 << 10
    src = _src(1 << 20, 4).pin_memory()
    te.load(0, 1, src, prefetch=True)
    te.pump(256 << 10)
    te.wait_slots(0, [1])
    torch.cuda.synchronize()
    assert torch.equal(te.arenas[0][1].cpu(), src)


def test_recorded_copies_and_close():
    te = TransferEngine([(2, 10_000)], torch.device("cpu"))
    te.chunk_bytes = 1_000
    te.record = True
    te.load(0, 0, _src(5_000, 5))
    te.load(0, 1, _src(3_000, 6), prefetch=True)
    te.pump(1_000)
    ev = te.event_times()
    assert [(k, s, n) for k, _, s, n, _, _ in ev] == [("load", 0, 5_000), ("prefetch", 1, 1_000)]
    assert all(isinstance(a, float) and a <= b for *_, a, b in ev) and ev[0][5] <= ev[1][4]
    te.close()  # queued chunks dropped, nothing in flight
    assert te.pending_bytes() == 0


@pytest.mark.gpu
def test_cuda_event_times_are_host_seconds():
    """On CUDA the recorded copies are device events; event_times places them on the host clock,
    inside the host interval in which they were issued and waited for."""
    import time

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    te = TransferEngine([(2, 4 << 20)], torch.device("cuda"))
    te.record = True
    t0 = time.perf_counter()
    te.load(0, 0, _src(4 << 20, 7).pin_memory())
    te.load(0, 1, _src(4 << 20, 8).pin_memory())
    ev = te.event_times()
    t1 = time.perf_counter()
    assert len(ev) == 2
    for kind, _, _, n, a, b in ev:
        assert kind == "load" and n == 4 << 20
        assert t0 - 1e-3 <= a <= b <= t1 + 1e-3
    te.close()


def test_host_zeros_registers_in_place_and_unregisters_after_the_last_view(monkeypatch):
    """Pinned arenas are numpy memory registered with cudaHostRegister (no power-of-two rounding);
    the registration lives as long as any tensor or array still views the memory."""
    import gc

    from hybrimoe import transfer

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, n, flags):
            calls.append(("register", ptr, n))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    t = transfer.host_zeros((3, 1000), pin=True)
    assert t.shape == (3, 1000) and t.dtype == torch.uint8 and not t.any()
    assert calls == [("register", t.data_ptr(), 3000)]
    row = t[1]  # a view made by a runtime (a slot's source span)
    del t
    gc.collect()
    assert [c[0] for c in calls] == ["register"]  # still viewed
    row.fill_(7)
    del row
    gc.collect()
    assert [c[0] for c in calls] == ["register", "unregister"] and calls[1][1] == calls[0][1]
    assert not transfer.host_zeros((2, 5), pin=False).any()


@pytest.mark.gpu
def test_host_zeros_pinned_on_cuda():
    from hybrimoe.transfer import host_zeros

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    t = host_zeros((4, 1 << 20), pin=True)
    assert t.is_pinned()
    t[2] = _src(1 << 20, 9)
    d = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    d.copy_(t[2], non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), t[2])
