"""What a HybridRuntime reports: per-layer counters (LayerStats) and the run's summary."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
    placed: int = 0  # experts moved in by a prompt-profiled placement (policy profiled)
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    total_s: float = 0.0
    # host time inside moe_begin: waiting for the routing's device->host copy (on CUDA: the
    # layer's attention finishing), planning up to the CPU submit, choosing/issuing prefetches
    sync_s: float = 0.0
    plan_s: float = 0.0
    prefetch_s: float = 0.0


def layer_stats(rt) -> dict[int, dict]:
    """{MoE layer: its LayerStats as a dict + prefetch_used / prefetch_wasted (prefetches made
    for that layer that were hit / evicted unused)}."""
    cache = rt.cache
    return {layer: {**dataclasses.asdict(rt.stats[layer]),
                    "prefetch_used": int(cache.prefetch_used_by_layer[i]),
                    "prefetch_wasted": int(cache.prefetch_wasted_by_layer[i])}
            for i, layer in enumerate(rt.moe_layers)}

def summary(rt) -> dict:
    tot = LayerStats()
    for s in rt.stats.values():
        for f in dataclasses.fields(LayerStats):
            setattr(tot, f.name, getattr(tot, f.name) + getattr(s, f.name))
    cs = rt.cache.stats()
    if rt.gpu_enabled:
        hits, misses, hit_rate = cs["hits"], cs["misses"], cs["hit_rate"]
    else:  # no GPU side: the host-only step never consults the (0-slot) cache; the layers count
        hits, misses = tot.hits, tot.misses
        hit_rate = hits / (hits + misses) if hits + misses else 0.0
    out = {
        "device": str(rt.device) + ("" if rt.gpu_real else (" (emulated gpu)" if rt.gpu_enabled else "")),
        "schedule": rt.schedule, "engine": rt.engine, "policy": rt.config.policy, "cpu_tier": rt.cpu_tier(),
        "hit_rate": hit_rate, "hits": hits, "misses": misses, "evictions": cs["evictions"],
        "experts_gpu": tot.on_gpu, "experts_cpu": tot.on_cpu, "pairs_gpu": tot.tokens_gpu,
        "pairs_cpu": tot.tokens_cpu, "pcie_bytes": rt.transfers.stats.bytes,
        "demand_loads": rt.transfers.stats.demand_loads, "prefetch_loads": rt.transfers.stats.prefetch_loads,
        "prefetch_used": cs["prefetch_used"], "prefetch_wasted": cs["prefetch_wasted"],
        "fills": tot.fills, "declined": cs["declined"], "placed": tot.placed,
        # mean host microseconds per MoE layer call (see LayerStats)
        "host_us": {k: getattr(tot, f"{k}_s") / max(tot.steps, 1) * 1e6 for k in ("sync", "plan", "prefetch")},
        "per_layer": layer_stats(rt),
    }
    if rt.prefetcher is not None:
        acc = rt.prefetcher.accuracy()
        out["prefetch_accuracy"] = acc.get(1, float("nan"))
    return out
