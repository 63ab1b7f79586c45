"""HybridMoELayer: a drop-in MoE block that splits each layer's experts between GPU and CPU.

One `HybridRuntime` per model owns what the layers share: the expert store (host blocks), the
cache (which experts sit in GPU slots), the transfer engine (slot arenas, copy streams), the
calibrated cost model, the scheduler mode, the prefetcher and the statistics. Each
`HybridMoELayer` holds its router, routing rule and shared expert, and calls the runtime:

    x (T, H) -> route -> cache.observe -> plan = scheduler.plan(...)      each expert: gpu | load | cpu
             -> loads (demand) -> CPU part submitted (C++ pool, GIL released)
             -> GPU part (Triton, waits only on its slots) -> prefetch for L+1..L+h
             -> y = y_gpu + cpu.wait() + shared(x)

Without CUDA: `emulate_gpu=True` keeps the GPU part on the host (slot arenas in host memory,
the "GPU" experts computed by the CPU kernels on slot views), so the cache, scheduler, prefetch
and slot addressing run for real in tests; `emulate_gpu="triton"` computes that GPU part with the
real GPU path's code instead (slot table, `gpu.moe_forward` over the host arena, in Triton's
interpreter: TRITON_INTERPRET=1; tests only, it is slow); `emulate_gpu=False` runs every routed
expert on the CPU kernels (mode cpu-only), which is what a CPU-only machine should do.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import reference
from .cache import ADMISSION_POLICIES, ExpertCache
from .costs import CostModel, calibrate, l3_bytes, load_or_calibrate
from .costs import resolve as resolve_costs
from .errors import HybrimoeError, ModelConfigError
from .formats import QuantTensor
from .prefetch import Prediction, Prefetcher, idle_budget
from .reference import RoutingConfig
from .scheduler import MODES
from .step import FillSpan, decide, fill, release
from .step import prefetch as prefetch_step
from .store import expert_views
from .transfer import TransferEngine


@dataclass(frozen=True)
class RuntimeConfig:
    """cache_size: GPU-resident experts per MoE layer; or gpu_budget: bytes shared by all layers.
    policy: mrs | lru | lfu | static | bypass (admission by windowed frequency, with fills in idle
    link time; hybrimoe.cache) — 'min' needs the future and runs in the simulator only.
    schedule: hybrid | kt-static | gpu-only | cpu-only | seed.
    prefetch_size: experts prefetched per layer (0 = off); horizon: layers looked ahead.
    cpu_threads: CPU expert-kernel threads (default: the physical cores, less one on CUDA, where
    the Python thread drives the GPU meanwhile). device: 'cuda' / 'cpu' / None (CUDA when
    available). emulate_gpu: on a host without CUDA, run the GPU side on the CPU (tests; True: CPU
    kernels, "triton": the Triton kernels in the interpreter; see module docstring). costs: path
    of a cost-model JSON or None to calibrate at start-up (cached per machine and shapes in
    cache_dir), or "paper-a6000[:model]" for the paper's testbed (datasheet numbers)."""

    cache_size: int | None = None
    gpu_budget: int | None = None
    policy: str = "mrs"
    schedule: str = "hybrid"
    prefetch_size: int = 0
    horizon: int = 3
    device: str | None = None
    emulate_gpu: bool | str = False
    cpu_threads: int | None = None
    costs: str | None = None
    cache_dir: str | None = None
    warm: str = "first"
    static_counts: np.ndarray | None = field(default=None, compare=False)
    record_timeline: bool = False
    seed_model: str = "deepseek"
    prefetch_chunk_bytes: int = 1 << 20  # granularity of prefetch copies (demand loads overtake between chunks)
    record_decisions: bool = False  # keep every step's LayerDecision / PrefetchDecision in runtime.decisions


@dataclass
class LayerStats:
    steps: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    refused: int = 0  # planned loads the cache had no slot for (run on the CPU)
    on_gpu: int = 0  # experts computed on the GPU (hits + loads)
    on_cpu: int = 0
    tokens_gpu: int = 0  # (token, expert) pairs
    tokens_cpu: int = 0
    bytes_moved: int = 0
    prefetch_issued: int = 0
    fills: int = 0  # experts run on the CPU, then copied into the cache in idle link time (bypass)
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    total_s: float = 0.0
    # host time inside moe_begin: waiting for the routing's device->host copy (on CUDA: the
    # layer's attention finishing), planning up to the CPU submit, choosing/issuing prefetches
    sync_s: float = 0.0
    plan_s: float = 0.0
    prefetch_s: float = 0.0


# Tokens up to which moe_begin brings the hidden states to the host in the routing copy.
_CARRY_X_TOKENS = 16


class _PairIndex:
    """The (token, routing weight) pairs of each activated expert, from one stable sort of the
    routing: of(e) -> (token ids int64 ascending, weights float32), views of two arrays built once."""

    def __init__(self, ids: np.ndarray, w: np.ndarray, experts: np.ndarray, counts: np.ndarray):
        k = ids.shape[1]
        order = np.argsort(ids.ravel(), kind="stable")  # pair index t*k + j, grouped by expert
        self.tok = order // k
        self.w = np.ascontiguousarray(w, np.float32).ravel()[order]
        ends = np.cumsum(counts).tolist()
        self.span = {e: (b - c, b) for e, b, c in zip(experts.tolist(), ends, counts.tolist())}

    def count(self, e: int) -> int:
        a, b = self.span[int(e)]
        return b - a

    def of(self, e: int):
        a, b = self.span[int(e)]
        return self.tok[a:b], self.w[a:b]


@dataclass
class _Pending:
    """A layer's MoE step between HybridRuntime.moe_begin and moe_end."""

    layer: int
    i: int
    x: torch.Tensor
    fut: object
    y: torch.Tensor | None
    plan: object
    t_start: float
    t_cpu0: float
    t_gpu0: float
    t_gpu1: float


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


class HybridRuntime:
    """Model-wide state shared by the HybridMoELayers of one model (see module docstring).

    store: ExpertStore-like (layers, layout(layer), expert(layer, e), arena_tensor(layer), config).
    """

    def __init__(self, store, config: RuntimeConfig = RuntimeConfig()):
        cfg = config
        if cfg.schedule not in MODES:
            raise HybrimoeError(f"unknown schedule {cfg.schedule!r} (expected one of {', '.join(MODES)})")
        self.store, self.config = store, cfg
        self._views: dict[tuple, tuple] = {}
        mc = store.config
        self.moe_layers = tuple(store.layers)
        self.index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.n_experts, self.top_k = mc.n_experts, mc.top_k
        want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise HybrimoeError("device 'cuda' requested but CUDA is not available on this machine "
                                "(use --device cpu)")
        self.device = torch.device(want)
        self.gpu_real = self.device.type == "cuda"
        if cfg.emulate_gpu not in (False, True, "triton"):
            raise HybrimoeError(f"emulate_gpu must be False, True or 'triton', found {cfg.emulate_gpu!r}")
        self.gpu_enabled = self.gpu_real or bool(cfg.emulate_gpu)
        # the GPU share goes through gpu.moe_forward (on CUDA, or in Triton's interpreter)
        self.gpu_triton = self.gpu_real or cfg.emulate_gpu == "triton"
        if self.gpu_triton and not self.gpu_real:
            from .gpu import _interpreting

            if not _interpreting():
                raise HybrimoeError("emulate_gpu='triton' on a host without CUDA needs TRITON_INTERPRET=1 "
                                    "in the environment before Triton is first imported")
        self.schedule = cfg.schedule if self.gpu_enabled else "cpu-only"
        self.cpu = _cpu_module()
        if self.cpu is not None and cfg.cpu_threads:
            self.cpu.set_num_threads(int(cfg.cpu_threads))
        elif self.cpu is not None and self.gpu_real:
            # the Python thread drives the GPU (routing copies, plans, launches, copies) while the
            # CPU experts run: leave it a core, or the OS time-slices it against the pool
            self.cpu.set_num_threads(max(1, self.cpu.physical_cores() - 1))
        n = len(self.moe_layers)
        layouts = [store.layout(layer) for layer in self.moe_layers]
        if cfg.gpu_budget is not None and cfg.cache_size is not None:
            raise HybrimoeError("give either cache_size (experts per layer) or gpu_budget (bytes), not both")
        if cfg.gpu_budget is not None:
            slot = max(lay.nbytes for lay in layouts)
            if cfg.gpu_budget < slot:
                raise HybrimoeError(f"gpu budget {cfg.gpu_budget} B is smaller than one expert ({slot} B)")
            layouts = [dataclasses.replace(lay, pad_to=slot) for lay in layouts]
            cap_kw = dict(byte_budget=int(cfg.gpu_budget), expert_bytes=[slot] * n)
            pools = [(int(cfg.gpu_budget) // slot, slot)]
        else:
            cs = self.n_experts // 4 if cfg.cache_size is None else int(cfg.cache_size)
            if not 0 <= cs <= self.n_experts:
                raise HybrimoeError(f"cache size {cs} experts per layer must be in 0..{self.n_experts}")
            if not self.gpu_enabled:
                cs = 0
            cap_kw = dict(capacity=cs, expert_bytes=[lay.nbytes for lay in layouts])
            pools = [(cs, lay.nbytes) for lay in layouts]
        self.layouts = layouts
        self.shared_pool = cfg.gpu_budget is not None
        self.cache = ExpertCache(n, self.n_experts, policy=cfg.policy, top_k=self.top_k,
                                 static_counts=cfg.static_counts, warm=cfg.warm, **cap_kw)
        self.transfers = TransferEngine(pools if self.gpu_enabled else [], self.device if self.gpu_real else
                                        torch.device("cpu"))
        self.transfers.record = cfg.record_timeline
        self.transfers.chunk_bytes = int(cfg.prefetch_chunk_bytes)
        # warm start: copy the experts the cache placed at construction into their slots
        if self.gpu_enabled:
            for i, layer in enumerate(self.moe_layers):
                for e, s in self.cache.resident(i).items():
                    self.transfers.load(self._pool(i), s, self._span(layer, e))
            self.transfers.stats = type(self.transfers.stats)()  # warm-up copies are not run-time traffic
            self.transfers.events.clear()
        self.costs = self._costs()
        self.prefetcher = Prefetcher(self.costs, cfg.prefetch_size, cfg.horizon,
                                     self.schedule) if cfg.prefetch_size > 0 and self.gpu_enabled else None
        self._fill_span = None  # FillSpan, on the first fill (admission policies)
        self.routers: dict[int, tuple[torch.Tensor, RoutingConfig]] = {}
        self._lookahead_cache: dict[int, tuple] = {}
        self._slot_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._router_stack = None  # every MoE layer's router (n_layers*E, H) float, for look-ahead
        self.stats = {layer: LayerStats() for layer in self.moe_layers}
        self.timeline: list[dict] = []
        self.decisions: list[tuple] = []  # (step, LayerDecision | PrefetchDecision) with record_decisions
        self.step = 0
        self.record_routing = False  # generate --trace-out: keep every layer's routing
        self._routing_log: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        # Benchmarks only: route_override(layer, x) -> (ids, weights, probs) or None replaces the
        # router's choice (routing replayed from a real trace); kernels, cache and transfers run as usual.
        self.route_override = None
        # CUDA: pinned buffer of the CPU experts' output, the event of its last copy to the device,
        # and the CPU job writing into it (see _cpu_out)
        self._cpu_out_buf: torch.Tensor | None = None
        self._cpu_out_read = None
        self._cpu_out_job = None
        self.closed = False

    def close(self) -> None:
        """Finish the copies in flight and drop queued prefetches; call before dropping a runtime
        whose slot arenas another one will reuse (the copy streams may still be writing them).
        Final: the cache still lists the dropped prefetches as resident, so later calls raise."""
        self.transfers.close()
        self.closed = True

    def set_costs(self, costs: CostModel) -> None:
        """Replace the cost model (e.g. a hand-given or loaded one) for the scheduler and prefetcher."""
        self.costs = costs
        if self.prefetcher is not None:
            self.prefetcher.costs = costs

    # -------------------------------------------------------------------------- helpers
    def _pool(self, i: int) -> int:
        return 0 if self.shared_pool else i

    def _span(self, layer: int, e: int) -> torch.Tensor:
        return self.store.arena_tensor(layer)[e]

    def cpu_tier(self) -> str:
        return self.cpu.tier() if self.cpu is not None else "reference (extension not built)"

    def _slot_weights(self, i: int, slot: int) -> tuple[QuantTensor, QuantTensor, QuantTensor]:
        """QuantTensor views of an expert in a (host) slot arena — the emulated GPU reads these.
        Memoised: the arenas never move, so a (layer, slot) view stays valid."""
        key = ("slot", i, slot)
        w = self._views.get(key)
        if w is None:
            v = expert_views(self.transfers.arenas[self._pool(i)][slot].numpy(), self.layouts[i])
            w = self._views[key] = self._prepared(v.gate, v.up, v.down)
        return w

    def _prepared(self, gate, up, down):
        """(gate, up, down), checked once for the CPU kernels when they are built."""
        return self.cpu.PreparedExpert(gate, up, down) if self.cpu is not None else (gate, up, down)

    def _slot_table(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pinned host, device) int32 (E,) expert -> slot tables of MoE layer i, allocated once.
        Rewriting the host table at the next step is safe: its last copy was issued on the
        current stream before the device->host routing copies (syncs) of every layer since."""
        t = self._slot_tables.get(i)
        if t is None:
            host = torch.empty(self.n_experts, dtype=torch.int32)
            t = self._slot_tables[i] = (host.pin_memory() if self.gpu_real else host,
                                        torch.empty(self.n_experts, dtype=torch.int32, device=self.device))
        return t

    def _cpu_out(self, T: int, H: int) -> torch.Tensor:
        """Zeroed pinned (T, H) float32 buffer for the CPU experts' output on CUDA: moe_end copies it
        to the device without a host sync. One buffer (grown by doubling) serves every layer; before
        it is rewritten, the last copy out of it must have finished (an event, normally long done)."""
        job = self._cpu_out_job
        if job is not None:  # a layer call that raised before moe_end may have left its job running
            self._cpu_out_job = None
            try:
                job.wait()
            except Exception:  # noqa: BLE001 - that call already failed; its job's error goes with it
                pass
        buf = self._cpu_out_buf
        if buf is None or buf.shape[0] < T:
            if buf is not None:
                self._cpu_out_read.synchronize()
            n = max(T, 2 * buf.shape[0] if buf is not None else 1)
            buf = self._cpu_out_buf = torch.empty(n, H, dtype=torch.float32).pin_memory()
            self._cpu_out_read = torch.cuda.Event()
        else:
            self._cpu_out_read.synchronize()
        out = buf[:T]
        out.zero_()
        return out

    def _host_weights(self, layer: int, e: int):
        """The expert's host blocks (views into the store's pinned arena), memoised per expert."""
        key = ("host", layer, e)
        w = self._views.get(key)
        if w is None:
            v = self.store.expert(layer, e)
            w = self._views[key] = self._prepared(v.gate, v.up, v.down)
        return w

    def _link_bw(self, i: int) -> float:
        """Bytes per second of host->slot copies for layer i, from the calibrated transfer time."""
        return self.layouts[i].nbytes / max(self.costs.transfer_time(i), 1e-9)

    def _ffn_submit(self, x: torch.Tensor, experts, toks, ws, out: torch.Tensor | None = None):
        """Fused FFN over (experts, token lists, weights) on the CPU pool, accumulated into `out`
        (zeros when None); reference fallback."""
        if not experts:
            return _SyncResult(None)
        if self.cpu is not None:
            return self.cpu.moe_ffn_submit(x, experts, toks, ws, out=out)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32) if out is None else out
        for (g, u, d), t, w in zip(experts, toks, ws):
            t = torch.as_tensor(t, dtype=torch.long)
            y = reference.expert_ffn(x[t], *(torch.from_numpy(q.dequantize()) for q in (g, u, d)))
            out.index_add_(0, t, torch.as_tensor(w, dtype=torch.float32)[:, None] * y)
        return _SyncResult(out)

    # -------------------------------------------------------------------------- costs
    def _costs(self) -> CostModel:
        cfg = self.config
        if cfg.costs:  # a calibration file, or 'paper-a6000[:model]' (the paper's testbed, datasheet numbers)
            return resolve_costs(cfg.costs, "mixtral" if self.n_experts == 8 else "deepseek-v2-lite")
        lay = self.layouts[0]
        layer0 = self.moe_layers[0]
        H = lay.hidden
        points = (1, 4, 16, 64, 256)
        # CPU: a ring of experts bigger than twice the last-level cache, each timed job on the
        # next one, so weights come from DRAM as in a run (one expert reused sits in L3: 1.45x
        # faster at 1 token on the 2-core box). Same-shape experts only (layout of layer 0).
        ring, ring_bytes = [], 0
        for i, layer in enumerate(self.moe_layers):
            if self.layouts[i] != lay:
                continue
            for e in range(self.n_experts):
                if ring_bytes >= 2 * l3_bytes() and len(ring) >= 2:
                    break
                ring.append(self._host_weights(layer, e))
                ring_bytes += lay.weight_bytes
        pos = [0]

        def next_expert():
            w = ring[pos[0] % len(ring)]
            pos[0] += 1
            return w

        def job_time(n: int, n_experts: int = 1) -> float:
            x = torch.randn(n, H)
            toks = [np.arange(n, dtype=np.int64)] * n_experts
            ws = [np.ones(n, np.float32)] * n_experts
            ex = [next_expert() for _ in range(n_experts)]
            t0 = time.perf_counter()
            self._ffn_submit(x, ex, toks, ws).wait()
            return time.perf_counter() - t0

        # warm-up outside the timings: first touch of the weights (page faults on the mmap), the
        # pool's threads, the clock (at least two passes over the ring and 0.2 s: on the shared
        # 2-core box the first ~1 s of jobs ran up to 3x slower than later ones)
        one, t_warm, passes = torch.randn(1, H), time.perf_counter(), 0
        while passes < 2 or time.perf_counter() - t_warm < 0.2:
            for w in ring:
                self._ffn_submit(one, [w], [np.zeros(1, np.int64)], [np.ones(1, np.float32)]).wait()
            passes += 1
        # per-job overhead (submit, wake the pool, join): a job of two experts costs 2 t1 - overhead;
        # one- and two-expert jobs interleaved, so a drifting clock biases neither
        singles, pairs = [], []
        for _ in range(11):
            singles.append(job_time(1))
            pairs.append(job_time(1, 2))
        t1 = float(np.median(singles))
        cpu_overhead = min(max(2 * t1 - float(np.median(pairs)), 0.0), 0.5 * t1)

        def measure_cpu(n):
            t = float(np.median([job_time(n) for _ in range(5)]))
            return max(t - cpu_overhead, 0.1 * t)  # timing noise must not make an expert free

        if self.gpu_real:
            from . import gpu

            arena = self.transfers.arenas[self._pool(0)]
            # expert 0 mapped to each slot in turn (up to 16): the weights of consecutive timed
            # calls are different slots, not one expert sitting in L2
            tables = []
            for slot in range(min(arena.shape[0], 16)):
                t = torch.full((self.n_experts,), -1, dtype=torch.int32, device=self.device)
                t[0] = slot
                tables.append(t)

            def measure_gpu(n):
                if not tables:
                    return 1.0  # no slots: never chosen anyway
                x = torch.randn(n, H, device=self.device, dtype=torch.bfloat16)
                ids = torch.zeros(n, 1, dtype=torch.int32, device=self.device)
                wts = torch.ones(n, 1, dtype=torch.float32, device=self.device)
                for k in range(3):
                    gpu.moe_forward(x, ids, wts, tables[k % len(tables)], arena, lay)
                torch.cuda.synchronize()
                st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                st.record()
                for k in range(10):
                    gpu.moe_forward(x, ids, wts, tables[k % len(tables)], arena, lay)
                en.record()
                torch.cuda.synchronize()
                return st.elapsed_time(en) / 10 / 1e3

            def measure_transfer():
                from .transfer import measure_h2d

                return measure_h2d(lay.nbytes, self.device)["pinned"]["seconds"]
        else:
            measure_gpu = measure_cpu  # emulated GPU: the same CPU kernels (and the same job overhead)

            def measure_transfer():
                src = self._span(layer0, 0)
                dst = torch.empty_like(src)
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    dst.copy_(src)
                    ts.append(time.perf_counter() - t0)
                return float(np.median(ts))

        def run():
            return calibrate(measure_cpu, measure_gpu, measure_transfer, points, expert_bytes=lay.nbytes,
                             cpu_layer_overhead=cpu_overhead,
                             gpu_layer_overhead=0.0 if self.gpu_real else cpu_overhead,
                             name=f"calibrated {self.device.type}{' (emulated gpu)' if not self.gpu_real else ''}",
                             meta={"cpu_ring_experts": len(ring), "cpu_ring_bytes": ring_bytes,
                                   "cpu_one_expert_job_s": t1})

        gpu_name = torch.cuda.get_device_name(self.device) if self.gpu_real else ("emulated" if self.gpu_enabled else "none")
        shape_key = (f"{lay.describe()}|cpu={self.cpu_tier()}|threads={self.cpu.num_threads() if self.cpu else 1}"
                     f"|points={points}|method=ring-overhead")
        cache_dir = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "hybrimoe", "costs")
        return load_or_calibrate(cache_dir, shape_key, run, gpu_name=gpu_name)

    # -------------------------------------------------------------------------- forward
    def register_router(self, layer: int, router_w: torch.Tensor, rc: RoutingConfig) -> None:
        self.routers[layer] = (router_w, rc)
        self._lookahead_cache.clear()
        self._router_stack = None

    def moe(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Routed-expert output (T, H) float32 on x's device, for routing (ids, w) of x (T, H)."""
        return self.moe_end(self.moe_begin(layer, x, ids, w, probs))

    def moe_begin(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, probs: torch.Tensor,
                  extra=None):
        """First half of `moe`: plan, issue loads, submit the CPU part, launch the GPU part and
        the prefetches; returns at once. Work the caller queues before `moe_end` (the shared
        expert's launches) overlaps the CPU experts. extra: optional (PreparedExpert, weights (T,)
        float32) applied to every token in the same CPU job (a shared expert kept as GGUF blocks
        on a host without CUDA), its output added to the layer's."""
        if self.closed:
            raise HybrimoeError("this HybridRuntime was closed (close() is final); build a new one")
        t_start = time.perf_counter()
        i = self.index[layer]
        st = self.stats[layer]
        st.steps += 1
        T_, H = x.shape
        # Routing to the host in ONE device->host copy (each is a sync on CUDA): ids (exact in
        # float32 below 2^24), weights, the full scores when MRS or the trace recorder reads them,
        # and the look-ahead routers' top-k on this input (prefetch), launched before the copy.
        want_probs = self.cache.policy == "mrs" or self.record_routing
        la_ids = self._lookahead_ids(i, x) if self.prefetcher is not None else None
        # At decode sizes the hidden states ride along too: the CPU experts need them on the host,
        # and a second device->host copy would be a second sync (a prefill's would be megabytes
        # copied for nothing when every expert runs on the GPU).
        carry_x = self.gpu_enabled and T_ <= _CARRY_X_TOKENS
        named = [("ids", ids), ("w", w), ("probs", probs if want_probs else None), ("la", la_ids),
                 ("x", x if carry_x else None)]
        named = [(n, t) for n, t in named if t is not None]
        host = torch.cat([t.float() for _, t in named], 1).cpu().numpy()
        t_routed = time.perf_counter()
        st.sync_s += t_routed - t_start
        part, c0 = {}, 0  # name -> its columns of `host`
        for n, t in named:
            part[n] = host[:, c0:c0 + t.shape[1]]
            c0 += t.shape[1]
        ids_np = part["ids"].astype(np.int64)
        w_np = part["w"]
        p_np = part.get("probs")
        la_np = part["la"].astype(np.int64) if "la" in part else None
        x_carried = part.get("x")
        counts = np.bincount(ids_np.ravel(), minlength=self.n_experts)
        experts = np.flatnonzero(counts)  # activated experts, ascending
        counts = counts[experts]
        if self.record_routing:
            self._routing_log.append((self.step, layer, ids_np.copy(), np.take_along_axis(p_np, ids_np, 1)))
        # observe -> access -> plan -> pin -> admit: the sequence the simulator drives too (hybrimoe.step)
        d = decide(self.cache, self.costs, self.schedule, i, experts, counts,
                   p_np if self.cache.policy == "mrs" else None, prefetcher=self.prefetcher,
                   seed_model=self.config.seed_model)
        if self.config.record_decisions:
            self.decisions.append((self.step, d))
        st.hits += d.hits
        st.misses += len(experts) - d.hits
        st.refused += len(d.refused)
        p = d.plan
        pool = self._pool(i)
        slot_of = d.slots
        cpu_list = list(p.cpu)
        for e, slot in d.loads:  # demand loads first
            self.transfers.load(pool, slot, self._span(layer, e))
        st.loads += len(d.loads)
        st.bytes_moved += len(d.loads) * self.layouts[i].weight_bytes
        # CPU part: one fused call, submitted before the GPU part so both run together
        # host copies only when the host computes something (on CUDA each is a device->host copy)
        need_host = bool(cpu_list) or not self.gpu_real
        x_host = None
        if need_host:
            x_host = (torch.from_numpy(np.ascontiguousarray(x_carried)) if x_carried is not None
                      else x.detach().to("cpu", torch.float32).contiguous())
        pairs = _PairIndex(ids_np, w_np, experts, counts)
        toks, wts, ws_cpu = [], [], []
        for e in cpu_list:
            tok, wt = pairs.of(e)
            toks.append(tok)
            wts.append(wt)
            ws_cpu.append(self._host_weights(layer, e))
        st.on_cpu += len(cpu_list)
        st.tokens_cpu += int(sum(len(t) for t in toks))
        if extra is not None:  # in the same job, after the routed experts' statistics
            if self.gpu_real:
                raise HybrimoeError("moe_begin(extra=...) is for a host without CUDA (there the shared "
                                    "expert runs on the GPU)")
            ws_cpu.append(extra[0])
            toks.append(np.arange(T_, dtype=np.int64))
            wts.append(np.ascontiguousarray(extra[1], dtype=np.float32).reshape(T_))
        t_cpu0 = time.perf_counter()
        st.plan_s += t_cpu0 - t_routed
        out = self._cpu_out(T_, H) if self.gpu_real and cpu_list else None
        fut = self._ffn_submit(x_host, ws_cpu, toks, wts, out=out)
        if out is not None:
            self._cpu_out_job = fut
        # GPU part
        t_gpu0 = time.perf_counter()
        y = None
        if slot_of:
            st.on_gpu += len(slot_of)
            st.tokens_gpu += sum(pairs.count(e) for e in slot_of)
            if self.gpu_triton:
                from . import gpu

                sl_host, sl_dev = self._slot_table(i)
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
            else:  # emulated GPU: the CPU kernels on the host slot arena
                self.transfers.wait_slots(pool, slot_of.values())  # queued prefetch chunks of these slots
                g_ex, g_tok, g_w = [], [], []
                for e, s in slot_of.items():
                    tok, wt = pairs.of(e)
                    g_ex.append(self._slot_weights(i, s))
                    g_tok.append(tok)
                    g_w.append(wt)
                y = self._ffn_submit(x_host, g_ex, g_tok, g_w).wait()
        t_gpu1 = time.perf_counter()
        st.gpu_s += t_gpu1 - t_gpu0
        # prefetch for the next layers while this one computes, then issue queued prefetch chunks
        # worth this layer's predicted idle link time (demand loads of the next layer come after)
        if self.prefetcher is not None:
            self._prefetch(i, la_np, p)
        if self.gpu_enabled and self.cache.policy in ADMISSION_POLICIES:  # after prefetches, as the simulator
            self._fill(i, d)
        if self.transfers._pending:
            self.transfers.pump(max(0.0, p.makespan - p.pcie_end) * self._link_bw(i))
        st.prefetch_s += time.perf_counter() - t_gpu1
        return _Pending(layer, i, x, fut, y, p, t_start, t_cpu0, t_gpu0, t_gpu1)

    def moe_end(self, pend: "_Pending") -> torch.Tensor:
        """Second half of `moe`: wait for the CPU part and add it to the GPU part."""
        layer, i, x, p, y = pend.layer, pend.i, pend.x, pend.plan, pend.y
        st = self.stats[layer]
        T_, H = x.shape
        y_cpu = pend.fut.wait()
        if self._cpu_out_job is pend.fut:
            self._cpu_out_job = None
        t_cpu0, t_gpu0, t_gpu1, t_start = pend.t_cpu0, pend.t_gpu0, pend.t_gpu1, pend.t_start
        t_cpu1 = time.perf_counter()
        st.cpu_s += t_cpu1 - t_cpu0
        if y_cpu is not None and self.gpu_real:  # from the pinned buffer, without a host sync
            y_cpu = y_cpu.to(x.device, non_blocking=True)
            self._cpu_out_read.record()
        if y is None:
            y = y_cpu if y_cpu is not None else torch.zeros(T_, H, dtype=torch.float32, device=x.device)
        elif y_cpu is not None:
            y = y + y_cpu
        release(self.cache, i)
        st.total_s += time.perf_counter() - t_start
        if self.config.record_timeline:
            self.timeline.append({"step": self.step, "layer": layer, "t0": t_start, "cpu": (t_cpu0, t_cpu1),
                                  "gpu": (t_gpu0, t_gpu1), "plan": p, "loads": len(p.loads)})
        return y

    def _lookahead(self, i: int):
        """(MoE layer indices i+1..i+h whose routers are known, their router weights (n*E, H) on the
        device): one matmul predicts every look-ahead layer. The weights are a slice of one stack
        of all the model's routers, built on first use (one extra copy of the routers in all)."""
        la = self._lookahead_cache.get(i)
        if la is None:
            js = []
            for j in range(i + 1, min(i + 1 + self.prefetcher.horizon, len(self.moe_layers))):
                if self.moe_layers[j] not in self.routers:
                    break
                js.append(j)
            w = None
            if js:
                if self._router_stack is None:  # layers without a router yet: zeros, never sliced
                    H = self.store.config.hidden
                    self._router_stack = torch.cat([
                        self.routers[layer][0].detach().float().to(self.device) if layer in self.routers else
                        torch.zeros(self.n_experts, H, device=self.device) for layer in self.moe_layers])
                E = self.n_experts
                w = self._router_stack[js[0] * E:(js[-1] + 1) * E]
            la = self._lookahead_cache[i] = (js, w)
        return la

    def predict(self, i: int, x: torch.Tensor) -> dict[int, Prediction]:
        """Predicted experts of MoE layers i+1..i+horizon (indices into moe_layers) for input x of
        layer i: {layer index: Prediction}, confidence = measured recall at that distance."""
        la = self._lookahead_ids(i, x)
        return {} if la is None else self._predictions(i, la.cpu().numpy())

    def _lookahead_ids(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """(T, n*k) expert ids on x's device that the routers of the n look-ahead layers of MoE
        layer i pick for x (one matmul, one top-k; no host sync), or None when there are none.
        Each look-ahead layer's router applied to this layer's input is the paper's prediction;
        softmax and sigmoid are monotonic per row, so the top-k of the logits are the routed ids."""
        js, w_stack = self._lookahead(i)
        if not js:
            return None
        logits = (x.float() @ w_stack.T).view(x.shape[0], len(js), self.n_experts)
        return torch.topk(logits, self.top_k, dim=-1).indices.reshape(x.shape[0], -1)

    def _predictions(self, i: int, la_np: np.ndarray) -> dict[int, Prediction]:
        """Predictions of the look-ahead layers from their top-k ids (T, n*k) on the host."""
        js, _ = self._lookahead(i)
        pred_ids = la_np.reshape(la_np.shape[0], len(js), self.top_k)
        # confidence = this run's measured recall of predictions made d+1 layers ahead (0.5 until
        # there is a measurement): the prefetcher weighs each candidate's gain by it
        acc = self.prefetcher.accuracy()
        preds = {}
        for d, j in enumerate(js):
            c = np.bincount(pred_ids[:, d].ravel(), minlength=self.n_experts)
            e = np.flatnonzero(c)
            preds[j] = Prediction(e, c[e], np.full(len(e), acc.get(d + 1, 0.5)))
        return preds

    def _fill(self, i: int, d) -> None:
        """Admission policies: copy experts this layer ran on the CPU into the cache (hybrimoe.step.fill),
        as prefetch-class copies that demand loads overtake, in the idle link time of the layers
        up to the next one that lately made demand loads (hybrimoe.step.FillSpan, as the
        simulator; each idle window taken equal to this one's) less what is queued."""
        p = d.plan
        if self._fill_span is None:
            self._fill_span = FillSpan(len(self.moe_layers))
        self._fill_span.update(d)
        backlog = (self.transfers.pending_bytes() / self._link_bw(i)
                   + self.transfers.prefetches_in_flight() * self.costs.transfer_time(i))
        idle = self._fill_span.span(i) * max(0.0, p.makespan - p.pcie_end) - backlog
        layer = self.moe_layers[i]
        for fd in fill(self.cache, self.costs, d, idle_s=idle):
            if self.config.record_decisions:
                self.decisions.append((self.step, fd))
            self.transfers.load(self._pool(i), fd.slot, self._span(layer, fd.expert), prefetch=True)
            self.stats[layer].fills += 1

    def _prefetch(self, i: int, la_np: np.ndarray | None, p) -> None:
        if la_np is None:
            return
        preds = self._predictions(i, la_np)
        # backlog: link time of prefetch bytes still queued or in flight, so the budget is not overcommitted.
        # Prefetches move in chunks that demand loads overtake, so one may span several layers' idle time.
        backlog = (self.transfers.pending_bytes() / self._link_bw(i)
                   + self.transfers.prefetches_in_flight() * self.costs.transfer_time(i))
        idle = idle_budget(i, p.makespan, p.pcie_end, 0.0, backlog, self.prefetcher.horizon, len(self.moe_layers),
                           spans_layers=True)
        for pd in prefetch_step(self.cache, self.prefetcher, i, preds, idle_before=idle):
            o = pd.order
            if self.config.record_decisions:
                self.decisions.append((self.step, pd))
            layer = self.moe_layers[o.layer]
            self.transfers.load(self._pool(o.layer), pd.slot, self._span(layer, o.expert), prefetch=True)
            self.stats[self.moe_layers[i]].prefetch_issued += 1

    def routing_trace(self, name: str = "hybrimoe run"):
        """The recorded routing as a hybrimoe.traces.Trace (step 0 = prefill, later steps decode)."""
        from .traces import DECODE, PREFILL, Trace

        by_step: dict[int, dict[int, tuple]] = {}
        for step, layer, ids, sc in self._routing_log:
            by_step.setdefault(step, {})[layer] = (ids, sc)
        rows_ids, rows_sc, phase = [], [], []
        for step in sorted(by_step):
            d = by_step[step]
            if sorted(d) != list(self.moe_layers):
                continue  # an incomplete step (interrupted run)
            rows_ids.append(np.stack([d[layer][0] for layer in self.moe_layers], 1))
            rows_sc.append(np.stack([d[layer][1] for layer in self.moe_layers], 1))
            phase += [PREFILL if step == 0 else DECODE] * rows_ids[-1].shape[0]
        if not rows_ids:
            raise HybrimoeError("no complete step of routing was recorded")
        ids = np.concatenate(rows_ids).astype(np.int16)
        return Trace(ids, np.concatenate(rows_sc).astype(np.float32), np.asarray(phase, np.uint8),
                     np.zeros(len(phase), np.int32), np.asarray(self.moe_layers, np.int16), self.n_experts,
                     name=name, score_kind="softmax_topk", source="hybrimoe.generate --trace-out")

    # -------------------------------------------------------------------------- summary
    def layer_stats(self) -> dict[int, dict]:
        """{MoE layer: its LayerStats as a dict + prefetch_used / prefetch_wasted (prefetches made
        for that layer that were hit / evicted unused)}."""
        cache = self.cache
        return {layer: {**dataclasses.asdict(self.stats[layer]),
                        "prefetch_used": int(cache.prefetch_used_by_layer[i]),
                        "prefetch_wasted": int(cache.prefetch_wasted_by_layer[i])}
                for i, layer in enumerate(self.moe_layers)}

    def summary(self) -> dict:
        tot = LayerStats()
        for s in self.stats.values():
            for f in dataclasses.fields(LayerStats):
                setattr(tot, f.name, getattr(tot, f.name) + getattr(s, f.name))
        cs = self.cache.stats()
        out = {
            "device": str(self.device) + ("" if self.gpu_real else (" (emulated gpu)" if self.gpu_enabled else "")),
            "schedule": self.schedule, "policy": self.config.policy, "cpu_tier": self.cpu_tier(),
            "hit_rate": cs["hit_rate"], "hits": cs["hits"], "misses": cs["misses"], "evictions": cs["evictions"],
            "experts_gpu": tot.on_gpu, "experts_cpu": tot.on_cpu, "pairs_gpu": tot.tokens_gpu,
            "pairs_cpu": tot.tokens_cpu, "pcie_bytes": self.transfers.stats.bytes,
            "demand_loads": self.transfers.stats.demand_loads, "prefetch_loads": self.transfers.stats.prefetch_loads,
            "prefetch_used": cs["prefetch_used"], "prefetch_wasted": cs["prefetch_wasted"],
            "fills": tot.fills, "declined": cs["declined"],
            # mean host microseconds per MoE layer call (see LayerStats)
            "host_us": {k: getattr(tot, f"{k}_s") / max(tot.steps, 1) * 1e6 for k in ("sync", "plan", "prefetch")},
            "per_layer": self.layer_stats(),
        }
        if self.prefetcher is not None:
            acc = self.prefetcher.accuracy()
            out["prefetch_accuracy"] = acc.get(1, float("nan"))
        return out


class HybridMoELayer(nn.Module):
    """Drop-in MoE block. forward(hidden (..., H)) -> (..., H) in hidden's dtype.

    router_weight: (E, H) float; routing: RoutingConfig (top-k, softmax/sigmoid, renormalisation,
    scale); shared: optional module (or callable) for shared experts, added to the output;
    shared_gate: optional (H,) / (1, H) weight of qwen2moe's sigmoid gate on the shared expert.
    """

    def __init__(self, runtime: HybridRuntime, layer: int, router_weight: torch.Tensor, routing: RoutingConfig,
                 shared=None, shared_gate: torch.Tensor | None = None):
        super().__init__()
        if layer not in runtime.index:
            raise ModelConfigError(f"layer {layer} is not a MoE layer of this model ({runtime.moe_layers})")
        self.runtime, self.layer, self.routing = runtime, layer, routing
        self.router_weight = nn.Parameter(router_weight.detach().float(), requires_grad=False)
        self.shared = shared
        self.shared_gate = None if shared_gate is None else nn.Parameter(shared_gate.detach().float().reshape(1, -1),
                                                                         requires_grad=False)
        runtime.register_router(layer, self.router_weight, routing)
        self._shared_blocks = self._fusable_shared(shared)

    def _fusable_shared(self, shared):
        """The shared expert as a CPU-kernel expert (PreparedExpert) when it can join the routed
        experts' CPU job: no CUDA, its three projections kept as GGUF blocks (QuantLinear, no bias,
        expert types) and a SiLU gate. Then one native call computes routed + shared experts: no
        three separate matmul jobs, no pool round trips between them. Else None."""
        from .qlinear import QuantLinear

        rt = self.runtime
        if shared is None or rt.gpu_real or rt.cpu is None:
            return None
        projs = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, QuantLinear) and p.bias is None for p in projs):
            return None
        act = getattr(shared, "act_fn", None)
        if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):  # transformers' own
            return None
        try:
            return rt.cpu.PreparedExpert(*(p.qt for p in projs), name=f"layer {self.layer} shared expert")
        except Exception:  # noqa: BLE001 - a type or shape the fused kernel does not take: run it apart
            return None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        r = None if self.runtime.route_override is None else self.runtime.route_override(self.layer, x)
        ids, w, probs = r if r is not None else reference.route(x, self.router_weight, self.routing)
        gate = None if self.shared_gate is None else torch.sigmoid(x.float() @ self.shared_gate.T)  # (T, 1)
        extra = None
        if self._shared_blocks is not None:  # the shared expert rides in the CPU experts' job
            sw = gate.reshape(-1) if gate is not None else torch.ones(x.shape[0])
            extra = (self._shared_blocks, sw.detach().numpy())
        pend = self.runtime.moe_begin(self.layer, x, ids, w, probs, extra=extra)
        s = None
        if self.shared is not None and extra is None:  # queued while the CPU experts run (CUDA: async)
            s = self.shared(x).float()
            if gate is not None:
                s = s * gate
        y = self.runtime.moe_end(pend)
        if s is not None:
            y = y + s
        return y.to(hidden.dtype).reshape(shape)


def hybrid_factory(runtime: HybridRuntime):
    """moe_factory for hybrimoe.models.load_gguf_model / patch: replaces a transformers MoE block
    (router at `block.gate.weight`, shared expert at `shared_experts` / `shared_expert`, qwen2moe's
    `shared_expert_gate`) by a HybridMoELayer on `runtime`."""

    def make(layer: int, block: nn.Module, gguf_model, store) -> HybridMoELayer:
        shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        gate = getattr(block, "shared_expert_gate", None)
        return HybridMoELayer(runtime, layer, block.gate.weight, RoutingConfig.from_moe_config(runtime.store.config),
                              shared=shared, shared_gate=None if gate is None else gate.weight)

    return make
