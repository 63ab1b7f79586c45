// The native per-layer decision engine: the C++ twin of hybrimoe/cache.py (ExpertCache) plus
// hybrimoe/step.py's decide() with hybrimoe/scheduler.py's plan. One call per MoE layer does
// observe -> access -> plan -> pin -> admit on state kept here, with no Python in between; the
// Python policies stay the readable reference and tests/test_engine.py requires identical
// decisions step by step. Python face: hybrimoe/engine.py. A second call per layer, prefetch(),
// is the twin of Prefetcher.choose plus the admission of its orders (hybrimoe/step.py prefetch).
//
// Outputs of decide() go into caller-owned buffers (numpy twins in hybrimoe/engine.py):
//   DecideHeader (8 int32), then int32 lists in the order of the header's counts, and
//   8 float64 times (planned cpu/gpu/pcie end + makespan, then the same for the final plan).
#pragma once

#include <cstdint>

struct DecideHeader {
    int32_t hits;          // activated experts that were resident
    int32_t n_gpu;         // planned (and final) GPU experts on resident slots
    int32_t n_loads;       // planned loads
    int32_t n_cpu;         // planned CPU experts
    int32_t n_admitted;    // loads that got a slot
    int32_t n_refused;     // loads the cache refused (they run on the CPU)
    int32_t n_evicted;     // (layer, expert) pairs the admitted loads evicted
    int32_t n_cpu_final;   // n_cpu + n_refused
};
static_assert(sizeof(DecideHeader) == 32, "DecideHeader: 8 int32 (numpy twin hybrimoe.engine.HEADER_DTYPE)");

// int32 lists after the header, in this order:
//   gpu[n_gpu], gpu_slots[n_gpu], loads[n_loads], cpu[n_cpu], admitted[n_admitted],
//   admitted_slots[n_admitted], refused[n_refused], evicted[2 * n_evicted] (layer, expert),
//   cpu_final[n_cpu_final]
// The buffer needs 8 + 8 * n_experts int32 at most (n_experts activated).
