"""HybridRuntime: sequences one MoE layer step; the model-wide state the HybridMoELayers share.

One token through one MoE layer (moe_begin, then moe_end):

    routing (ids, weights, scores, look-ahead ids, small x) -> host          one device->host copy
    d = step.decide(cache, costs, schedule, layer, experts, counts, scores)   observe, access, plan,
                                                                              pin, admit (step.py)
    transfers.load(slot, expert) for each admitted demand load                transfer.py
    cpu_side.submit(x, experts of d.plan.cpu)                                 executors.CpuSide, C++ pool
    gpu.run(layer, x, slots of d.slots)                                       executors: TritonGpu on
                                                                              CUDA, EmulatedGpu on a host
    step.prefetch(cache, prefetcher, layer, lookahead.predictions(...))       prefetch.py, lookahead.py
    transfers.pump(idle link bytes)                                           queued prefetch chunks
    ---- moe_end: y = y_gpu + cpu job's output; step.release(cache, layer)

Shared by the layers: the expert store (host blocks), the cache (which experts sit in GPU slots),
the transfer engine (slot arenas, copy streams), the cost model (calibration.py, or given), the
prefetcher and look-ahead, the statistics (stats.py). RuntimeConfig holds every behaviour switch,
among them the GPU side ("cuda", "emulated", "emulated-triton", "none"; see executors.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import stats
from .cache import ADMISSION_POLICIES, ExpertCache
from .calibration import runtime_costs
from .costs import CostModel
from .errors import HybrimoeError
from .executors import CpuSide, gpu_executor
from .lookahead import LookAhead
from .prefetch import PREFETCH_MODES, Prediction, Prefetcher, idle_budget
from .reference import RoutingConfig
from .stats import LayerStats
from .scheduler import MODES
from .step import FillSpan, decide, fill, place, release
from .step import prefetch as prefetch_step
from .transfer import TransferEngine


GPU_SIDES = ("cuda", "emulated", "emulated-triton", "none")
ENGINES = ("auto", "native", "python")


@dataclass(frozen=True)
class RuntimeConfig:
    """cache_size: GPU-resident experts per MoE layer; or gpu_budget: bytes shared by all layers.
    policy: mrs | lru | lfu | static | bypass (admission by windowed frequency, with fills in idle
    link time; hybrimoe.cache) | profiled (bypass with the prompt's routing as its prior and a
    placement between prefill and decode: `new_sequence` opens the profile, `begin_decode`
    places; profile_tokens: the decode length a placement expects when `begin_decode` is not
    told) — 'min' needs the future and runs in the simulator only.
    schedule: hybrid | kt-static | gpu-only | cpu-only | seed.
    prefetch_size: experts prefetched per layer (0 = off); horizon: layers looked ahead;
    prefetch_mode: impact | pays (hybrimoe.prefetch: pays prefetches only where the gain, with the
    per-layer measured look-ahead hit rate fed back, beats the copy's cost; Python decisions only).
    cpu_threads: CPU expert-kernel threads (default: the physical cores, less one on CUDA, where
    the Python thread drives the GPU meanwhile). device: 'cuda' / 'cpu' / None (CUDA when
    available). gpu: the GPU side (GPU_SIDES): "cuda" (the real one), "emulated" (on a host
    without CUDA, slot arenas in host memory, the GPU experts computed by the CPU kernels: tests),
    "emulated-triton" (the same, computed by the Triton kernels in the interpreter), "none" (every
    routed expert on the CPU); None: "cuda" when the device is CUDA, else from `emulate_gpu`
    (older spelling: True = "emulated", "triton" = "emulated-triton", False = "none"). costs: a
    CostModel, the path of a cost-model JSON, "paper-a6000[:model]" (the paper's testbed,
    datasheet numbers), or None to calibrate at start-up (cached per machine and shapes in
    cache_dir). record_routing: keep every layer's routing (generate --trace-out;
    `routing_trace()`). record_decisions: keep every LayerDecision / PrefetchDecision
    (`runtime.decisions`). engine: who takes the per-layer decisions (ENGINES): "native" (the C++
    engine, hybrimoe.engine: one call per layer), "python" (the readable policies), "auto" (native
    when the extension is built and runs the policy and prefetch mode; the two decide identically,
    tests/test_engine.py; policy profiled and prefetch mode pays have only their Python implementation)."""

    cache_size: int | None = None
    gpu_budget: int | None = None
    policy: str = "mrs"
    schedule: str = "hybrid"
    prefetch_size: int = 0
    horizon: int = 3
    device: str | None = None
    gpu: str | None = None
    emulate_gpu: bool | str = False
    cpu_threads: int | None = None
    costs: "str | CostModel | None" = None
    cache_dir: str | None = None
    warm: str = "first"
    static_counts: np.ndarray | None = field(default=None, compare=False)
    record_timeline: bool = False
    seed_model: str = "deepseek"
    prefetch_chunk_bytes: int = 1 << 20  # granularity of prefetch copies (demand loads overtake between chunks)
    record_routing: bool = False
    record_decisions: bool = False
    engine: str = "auto"
    profile_tokens: int = 128
    prefetch_mode: str = "impact"

    def gpu_side(self, device: torch.device) -> str:
        """The GPU side this configuration asks for on `device` (see the class docstring)."""
        if self.emulate_gpu not in (False, True, "triton"):
            raise HybrimoeError(f"emulate_gpu must be False, True or 'triton', found {self.emulate_gpu!r}")
        cuda = device.type == "cuda"
        if self.gpu is None:
            return "cuda" if cuda else {False: "none", True: "emulated", "triton": "emulated-triton"}[self.emulate_gpu]
        if self.gpu not in GPU_SIDES:
            raise HybrimoeError(f"gpu side {self.gpu!r} (expected one of {', '.join(GPU_SIDES)})")
        if (self.gpu == "cuda") != cuda:
            raise HybrimoeError(f"gpu side {self.gpu!r} does not go with device {device.type!r}"
                                + (" (use device 'cuda')" if self.gpu == "cuda" else " (use device 'cpu')"))
        return self.gpu


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


class HybridRuntime:
    """Model-wide state shared by the HybridMoELayers of one model (see module docstring).

    store: ExpertStore-like (layers, layout(layer), expert(layer, e), arena_tensor(layer), config).
    """

    def __init__(self, store, config: RuntimeConfig = RuntimeConfig()):
        cfg = config
        if cfg.schedule not in MODES:
            raise HybrimoeError(f"unknown schedule {cfg.schedule!r} (expected one of {', '.join(MODES)})")
        self.store, self.config = store, cfg
        mc = store.config
        self.moe_layers = tuple(store.layers)
        self.index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.n_experts, self.top_k = mc.n_experts, mc.top_k
        emulated = cfg.gpu in ("emulated", "emulated-triton", "none")
        want = cfg.device or ("cuda" if torch.cuda.is_available() and not emulated else "cpu")
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise HybrimoeError("device 'cuda' requested but CUDA is not available on this machine "
                                "(use --device cpu)")
        self.device = torch.device(want)
        self.gpu_side = cfg.gpu_side(self.device)
        # read-only facts about the side (the work goes through self.gpu, its executor)
        self.gpu_real = self.gpu_side == "cuda"
        self.gpu_enabled = self.gpu_side != "none"
        self.gpu_triton = self.gpu_side in ("cuda", "emulated-triton")
        if self.gpu_side == "emulated-triton":
            from .gpu import _interpreting

            if not _interpreting():
                raise HybrimoeError("the 'emulated-triton' GPU side (emulate_gpu='triton') on a host without CUDA "
                                    "needs TRITON_INTERPRET=1 in the environment before Triton is first imported")
        self.schedule = cfg.schedule if self.gpu_enabled else "cpu-only"
        self.cpu_side = CpuSide(store, pinned_out=self.gpu_real, synchronous=not self.gpu_enabled)
        self.cpu = self.cpu_side.cpu
        if self.cpu is not None and cfg.cpu_threads:
            self.cpu.set_num_threads(int(cfg.cpu_threads))
        elif self.cpu is not None and self.gpu_real:
            # the Python thread drives the GPU (routing copies, plans, launches, copies) while the
            # CPU experts run: leave it a core, or the OS time-slices it against the pool
            self.cpu.set_num_threads(max(1, self.cpu.physical_cores() - 1))
        n = len(self.moe_layers)
        layouts = [store.layout(layer) for layer in self.moe_layers]
        if not 0 <= int(cfg.prefetch_size) <= self.n_experts:
            raise HybrimoeError(f"prefetch size {cfg.prefetch_size} experts per layer must be in 0..{self.n_experts}")
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
            self.transfers.reset_stats()  # warm-up copies are not run-time traffic
        self.gpu = gpu_executor(self.gpu_side, self.transfers, self.layouts, self._pool, self.n_experts, self.device,
                                self.cpu_side)
        self.costs = runtime_costs(self)
        # the decisions: native engine (one call per layer, GIL released) or the Python policies
        if cfg.engine not in ENGINES:
            raise HybrimoeError(f"engine {cfg.engine!r} (expected one of {', '.join(ENGINES)})")
        from . import engine as native_engine

        if cfg.engine == "native" and not native_engine.available():
            raise HybrimoeError("engine 'native' needs the hybrimoe._cpu extension built with engine.cpp "
                                "(pip install -e .); engine 'python' runs without it")
        if cfg.engine == "native" and cfg.policy not in native_engine.ENGINE_POLICIES:
            raise HybrimoeError(f"engine 'native' runs the cache policies {', '.join(native_engine.ENGINE_POLICIES)}, "
                                f"not {cfg.policy!r}; use engine 'auto' or 'python' for it")
        if not int(cfg.profile_tokens) >= 0:
            raise HybrimoeError(f"profile_tokens (the decode length a prompt placement expects) must be >= 0, "
                                f"found {cfg.profile_tokens}")
        if cfg.prefetch_mode not in PREFETCH_MODES:
            raise HybrimoeError(f"prefetch mode {cfg.prefetch_mode!r} (expected one of {', '.join(PREFETCH_MODES)})")
        pays = cfg.prefetch_mode != "impact" and cfg.prefetch_size > 0
        if cfg.engine == "native" and pays:
            raise HybrimoeError(f"engine 'native' chooses prefetches in mode 'impact' only, not "
                                f"{cfg.prefetch_mode!r}; use engine 'auto' or 'python' for it")
        if (cfg.engine != "python" and native_engine.available() and not pays
                and cfg.policy in native_engine.ENGINE_POLICIES):  # auto: profiled and pays run in Python
            self.cache = native_engine.NativeCache.from_cache(self.cache, self.costs)
        self.engine = "native" if getattr(self.cache, "native", False) else "python"
        self.prefetcher = Prefetcher(self.costs, cfg.prefetch_size, cfg.horizon, self.schedule,
                                     prefetch_mode=cfg.prefetch_mode) if cfg.prefetch_size > 0 and self.gpu_enabled else None
        self._fill_span = None  # FillSpan, on the first fill (admission policies)
        self.routers: dict[int, tuple[torch.Tensor, RoutingConfig]] = {}
        self.lookahead = LookAhead(self.routers, self.moe_layers, self.n_experts, self.top_k, mc.hidden,
                                   self.prefetcher.horizon if self.prefetcher is not None else 0, self.device)
        self.stats = {layer: LayerStats() for layer in self.moe_layers}
        self.timeline: list[dict] = []
        self.decisions: list[tuple] = []  # (step, LayerDecision | PrefetchDecision) with record_decisions
        self._step = 0
        self.record_routing = cfg.record_routing
        self._routing_log: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        # Benchmarks only: route_override(layer, x) -> (ids, weights, probs) or None replaces the
        # router's choice (routing replayed from a real trace); kernels, cache and transfers run as usual.
        self.route_override = None
        self.closed = False
        # (layer, step) of a moe_begin whose moe_end has not returned: set while a call runs, left
        # set when it raised or was interrupted (the cache may then list experts whose copy never
        # happened, or keep them pinned), so the next call refuses instead of computing on them.
        self._unfinished: tuple[int, int] | None = None

    @property
    def step(self) -> int:
        """Steps since the start of the sequence: 0 = the prefill, then one per decoded token
        (routing records and timelines are keyed by it). Moved by `new_sequence` / `next_step`."""
        return self._step

    @step.setter
    def step(self, value) -> None:
        raise HybrimoeError("runtime.step is the runtime's own counter: call runtime.new_sequence() before a "
                            "prompt and runtime.next_step() before each decoded token")

    def new_sequence(self) -> None:
        """A new prompt (or a chat's next turn): the next layer calls belong to its prefill (step 0).
        Policy profiled: opens a new profile of the prompt's routing (see `begin_decode`)."""
        self._step = 0
        if self.cache.policy == "profiled":
            self.cache.begin_profile()

    def next_step(self) -> int:
        """The next layer calls belong to the next decoded token; returns its step number. The
        first one after a prompt runs `begin_decode()` when the caller has not."""
        if getattr(self.cache, "profiling", False):
            self.begin_decode()
        self._step += 1
        return self._step

    def begin_decode(self, decode_tokens: int | None = None) -> list:
        """The prompt's prefill is done and about `decode_tokens` decoded tokens follow (default
        `RuntimeConfig.profile_tokens`). Policy profiled: close the prompt's profile and move the
        experts in that pay for their copy over that decode (hybrimoe.step.place, the simulator's
        rule); the copies go as prefetch-class transfers that demand loads overtake. Returns the
        PlaceDecisions (none for other policies, or when no profile is open)."""
        if not getattr(self.cache, "profiling", False):
            return []
        n = self.config.profile_tokens if decode_tokens is None else decode_tokens
        if n < 0:
            raise HybrimoeError(f"begin_decode: decode_tokens must be >= 0, found {n}")
        moves = place(self.cache, self.costs, n, self.schedule)
        for mv in moves:
            if self.config.record_decisions:
                self.decisions.append((self.step, mv))
            layer = self.moe_layers[mv.layer]
            self.transfers.load(self._pool(mv.layer), mv.slot, self._span(layer, mv.expert), prefetch=True)
            self.stats[layer].placed += 1
        return moves

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
        if getattr(self.cache, "native", False):
            self.cache.set_costs(costs)

    # -------------------------------------------------------------------------- helpers
    def _pool(self, i: int) -> int:
        return 0 if self.shared_pool else i

    def _span(self, layer: int, e: int) -> torch.Tensor:
        return self.store.arena_tensor(layer)[e]

    def cpu_tier(self) -> str:
        return self.cpu_side.tier()

    def _link_bw(self, i: int) -> float:
        """Bytes per second of host->slot copies for layer i, from the calibrated transfer time."""
        return self.layouts[i].nbytes / max(self.costs.transfer_time(i), 1e-9)

    # -------------------------------------------------------------------------- forward
    def register_router(self, layer: int, router_w: torch.Tensor, rc: RoutingConfig) -> None:
        self.routers[layer] = (router_w, rc)
        self.lookahead.routers_changed()

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
        if self._unfinished is not None:
            raise HybrimoeError(f"this HybridRuntime stopped: its call for MoE layer {self._unfinished[0]} (step "
                                f"{self._unfinished[1]}) raised or was interrupted, so its expert cache may not match "
                                "the slots; build a new one")
        self._unfinished = (layer, self.step)
        t_start = time.perf_counter()
        i = self.index[layer]
        st = self.stats[layer]
        st.steps += 1
        if not self.gpu_enabled and not (self.config.record_decisions or self.record_routing
                                         or self.config.record_timeline):
            return self._begin_host_only(layer, i, st, x, ids, w, extra, t_start)
        T_, H = x.shape
        # Routing to the host in ONE device->host copy (each is a sync on CUDA): ids (exact in
        # float32 below 2^24), weights, the full scores when MRS or the trace recorder reads them,
        # and the look-ahead routers' top-k on this input (prefetch), launched before the copy.
        want_probs = self.cache.policy == "mrs" or self.record_routing
        la_ids = self.lookahead.ids(i, x) if self.prefetcher is not None else None
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
            ws_cpu.append(self.cpu_side.host_weights(layer, e))
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
        out = self.cpu_side.out_buffer(T_, H) if self.gpu_real and cpu_list else None
        fut = self.cpu_side.submit(x_host, ws_cpu, toks, wts, out=out)
        if out is not None:
            self.cpu_side.out_job = fut
        # GPU part
        t_gpu0 = time.perf_counter()
        y = None
        if slot_of:
            st.on_gpu += len(slot_of)
            st.tokens_gpu += sum(pairs.count(e) for e in slot_of)
            y = self.gpu.run(i, x, x_host, ids, w, pairs, slot_of)
        t_gpu1 = time.perf_counter()
        st.gpu_s += t_gpu1 - t_gpu0
        # prefetch for the next layers while this one computes, then issue queued prefetch chunks
        # worth this layer's predicted idle link time (demand loads of the next layer come after)
        if self.prefetcher is not None:
            self._prefetch(i, la_np, p)
        if self.gpu_enabled and self.cache.policy in ADMISSION_POLICIES:  # after prefetches, as the simulator
            self._fill(i, d)
        if self.transfers.has_pending():
            self.transfers.pump(max(0.0, p.makespan - p.pcie_end) * self._link_bw(i))
        st.prefetch_s += time.perf_counter() - t_gpu1
        return _Pending(layer, i, x, fut, y, p, t_start, t_cpu0, t_gpu0, t_gpu1)

    def _begin_host_only(self, layer, i, st, x, ids, w, extra, t_start) -> "_Pending":
        """moe_begin on a host with no GPU side, nothing recorded: every expert runs on the CPU and
        the cache has no slots (capacity 0), so observe / access / plan / admit decide nothing; only
        the job is built. Stats as the full path counts them (every activated expert a miss on the CPU)."""
        T_ = x.shape[0]
        ids_np = ids.detach().to("cpu", torch.int64).numpy()
        w_np = w.detach().to("cpu", torch.float32).numpy()
        t_routed = time.perf_counter()
        st.sync_s += t_routed - t_start
        if T_ == 1 and ids_np.shape[1] == len(set(ids_np[0].tolist())):  # decode: k distinct experts, a token each
            order = np.argsort(ids_np[0], kind="stable")
            experts = ids_np[0][order]
            x_host = x.detach().to("cpu", torch.float32).contiguous()
            t_cpu0 = time.perf_counter()
            fut = self.cpu_side.submit_one_token(layer, x_host, experts, w_np[0][order], extra)
            if fut is not None:
                st.plan_s += t_cpu0 - t_routed
                st.misses += len(experts)
                st.on_cpu += len(experts)
                st.tokens_cpu += len(experts)
                t_gpu = time.perf_counter()
                return _Pending(layer, i, x, fut, None, None, t_start, t_cpu0, t_gpu, t_gpu)
        counts = np.bincount(ids_np.ravel(), minlength=self.n_experts)
        experts = np.flatnonzero(counts)
        counts = counts[experts]
        pairs = _PairIndex(ids_np, w_np, experts, counts)
        toks, wts, ws_cpu = [], [], []
        # the job sums experts in its list order: the plan's (tokens descending, then id), so the
        # output is bit-identical to the full path's
        for e in experts[np.lexsort((experts, -counts))].tolist():
            tok, wt = pairs.of(e)
            toks.append(tok)
            wts.append(wt)
            ws_cpu.append(self.cpu_side.host_weights(layer, e))
        st.misses += len(experts)
        st.on_cpu += len(experts)
        st.tokens_cpu += int(counts.sum())
        if extra is not None:
            ws_cpu.append(extra[0])
            toks.append(np.arange(T_, dtype=np.int64))
            wts.append(np.ascontiguousarray(extra[1], dtype=np.float32).reshape(T_))
        x_host = x.detach().to("cpu", torch.float32).contiguous()
        t_cpu0 = time.perf_counter()
        st.plan_s += t_cpu0 - t_routed
        fut = self.cpu_side.submit(x_host, ws_cpu, toks, wts)
        t_gpu = time.perf_counter()
        return _Pending(layer, i, x, fut, None, None, t_start, t_cpu0, t_gpu, t_gpu)

    def moe_end(self, pend: "_Pending") -> torch.Tensor:
        """Second half of `moe`: wait for the CPU part and add it to the GPU part."""
        layer, i, x, p, y = pend.layer, pend.i, pend.x, pend.plan, pend.y
        st = self.stats[layer]
        T_, H = x.shape
        y_cpu = pend.fut.wait()
        if self.cpu_side.out_job is pend.fut:
            self.cpu_side.out_job = None
        t_cpu0, t_gpu0, t_gpu1, t_start = pend.t_cpu0, pend.t_gpu0, pend.t_gpu1, pend.t_start
        t_cpu1 = time.perf_counter()
        st.cpu_s += t_cpu1 - t_cpu0
        if y_cpu is not None and self.gpu_real:  # from the pinned buffer, without a host sync
            y_cpu = y_cpu.to(x.device, non_blocking=True)
            self.cpu_side.out_read.record()
        if y is None:
            y = y_cpu if y_cpu is not None else torch.zeros(T_, H, dtype=torch.float32, device=x.device)
        elif y_cpu is not None:
            y = y + y_cpu
        if p is not None:  # the host-only path pinned nothing
            release(self.cache, i)
        st.total_s += time.perf_counter() - t_start
        if self.config.record_timeline and p is not None:
            self.timeline.append({"step": self.step, "layer": layer, "t0": t_start, "cpu": (t_cpu0, t_cpu1),
                                  "gpu": (t_gpu0, t_gpu1), "plan": p, "loads": len(p.loads)})
        self._unfinished = None
        return y

    def predict(self, i: int, x: torch.Tensor) -> dict[int, Prediction]:
        """Predicted experts of MoE layers i+1..i+horizon (indices into moe_layers) for input x of
        layer i: {layer index: Prediction}, confidence = measured recall at that distance."""
        la = self._lookahead_ids(i, x)
        return {} if la is None else self._predictions(i, la.cpu().numpy())

    def _lookahead_ids(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        return self.lookahead.ids(i, x)

    def _predictions(self, i: int, la_np: np.ndarray) -> dict[int, Prediction]:
        return self.lookahead.predictions(i, la_np, self.prefetcher.accuracy())

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
        """{MoE layer: its LayerStats as a dict + prefetch_used / prefetch_wasted}: stats.layer_stats."""
        return stats.layer_stats(self)

    def summary(self) -> dict:
        """The run's totals and per-layer figures: stats.summary."""
        return stats.summary(self)
