// The CPU MoE job's per-expert descriptor: one row per routed expert of a fused job, written by
// hybrimoe/cpu.py and read by cpu_module.cpp's make_moe_args. The numpy twin is
// hybrimoe.cpu.JOB_EXPERT_DTYPE (same field names, same order); tests compare both layouts
// through _cpu.job_expert_layout().
#pragma once

#include <cstddef>
#include <cstdint>

struct JobExpert {
    int64_t gate;       // address of the gate matrix's blocks (I, H)
    int64_t gate_type;  // its GGUF type id
    int64_t up;         // up matrix (I, H)
    int64_t up_type;
    int64_t down;       // down matrix (H, I)
    int64_t down_type;
    int64_t inter;      // I: the expert's intermediate width
    int64_t tok;        // address of the token ids (int32 or int64, see tok64)
    int64_t n_tok;      // how many tokens
    int64_t tok64;      // 1: token ids are int64, 0: int32
    int64_t wts;        // address of the routing weights (float32, one per token)
};

static_assert(sizeof(JobExpert) == 88, "JobExpert: 11 int64 fields, no padding (numpy twin JOB_EXPERT_DTYPE)");
static_assert(offsetof(JobExpert, wts) == 80, "JobExpert field order");
