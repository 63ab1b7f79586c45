// Internal interface between the tier implementations (ref / generic / avx512) and the driver
// (cpu_module.cpp). One tier = a table of per-type row kernels plus the activation format each
// kernel wants. No SIMD here: this header is included by every translation unit, before any
// `#pragma GCC target`, so nothing in it is ever compiled for a wider ISA than the baseline.
#pragma once
#include <cstddef>
#include <cstdint>

#include "blocks.h"

namespace hybrimoe {
namespace cpu {

// Type slot in the per-tier tables.
enum TypeSlot : int { SLOT_Q4_K = 0, SLOT_Q6_K = 1, SLOT_Q5_0 = 2, SLOT_Q8_0 = 3, N_SLOTS = 4 };

inline int type_slot(int qtype) {
    switch (qtype) {
        case (int)QType::Q4_K: return SLOT_Q4_K;
        case (int)QType::Q6_K: return SLOT_Q6_K;
        case (int)QType::Q5_0: return SLOT_Q5_0;
        case (int)QType::Q8_0: return SLOT_Q8_0;
        default: return -1;
    }
}

// How a token's activations are stored for a kernel.
enum class Act : int {
    F32 = 0,   // plain float row (ref tier)
    Q8K = 1,   // block_q8_K_act per 256 (K-quant weights in the integer tiers)
    Q8_0 = 2,  // block_q8_0_act per 32 (Q5_0 / Q8_0 weights in the integer tiers)
    Q8K_Q4 = 3,  // block_q8_K4_act, qs in Q4_K nibble order: per 128, [0..31, 64..95, 32..63,
                 // 96..127] (dsums stay in element order). The AVX-512 Q4_K kernel then pairs
                 // a 64-byte load of low / high nibbles with contiguous activations, no shuffles.
};
constexpr int N_ACTS = 4;

inline size_t act_row_bytes(Act a, int n) {
    switch (a) {
        case Act::F32: return (size_t)n * sizeof(float);
        case Act::Q8K: return (size_t)(n / QK_K) * sizeof(block_q8_K_act);
        case Act::Q8K_Q4: return (size_t)(n / QK_K) * sizeof(block_q8_K4_act);
        case Act::Q8_0: return (size_t)(n / QK8_0) * sizeof(block_q8_0_act);
    }
    return 0;
}

// y[t * ldy + i] = dot(W row (r0 + i), x[t]) for i in [0, r1 - r0), t in [0, T).
//   w:  the matrix's raw blocks, row r at w + r * row_bytes; cols weights per row
//   x:  T pointers to activation rows in the kernel's Act format
// Token tiles are the inner loop over rows so a row chunk (in L2) is reused by every tile and a
// tile of activations (in L1) by every row: the blocked prefill path is this same function.
using RowsFn = void (*)(const uint8_t* w, size_t row_bytes, int cols, int r0, int r1,
                        const void* const* x, int T, float* y, size_t ldy);
// Fills one activation row (n floats, n a multiple of the format's block) in format `a`.
using QuantizeFn = void (*)(const float* x, int n, void* dst);

struct TierOps {
    const char* name;
    RowsFn rows[N_SLOTS];
    Act act[N_SLOTS];
};

// Implemented in tier_ref.cpp (always), tier_avx2.cpp, tier_avx512*.cpp (x86 only).
const TierOps& ref_ops();            // dequantize-and-dot in float, float activations
const TierOps& generic_scalar_ops();  // integer dot, q8 activations, portable C++
#if defined(__x86_64__) || defined(_M_X64)
const TierOps& generic_avx2_ops();    // integer dot, AVX2 + FMA + F16C
const TierOps& avx512_ops();          // AVX-512 F/BW/VL/DQ without VNNI
const TierOps& avx512_vnni_ops();     // AVX-512 F/BW/VL/DQ + VNNI
// Float-activation Q4_K rows (AVX-512), kept only to measure the activation-path decision.
void q4k_rows_f32act_avx512(const uint8_t* w, size_t row_bytes, int cols, int r0, int r1,
                            const void* const* x, int T, float* y, size_t ldy);
#endif

// Measurement only (microbench/cpu_kernels.py's read ceiling): the sum of n bytes read once,
// streaming. Portable (tier_ref.cpp) and AVX2 (tier_avx2.cpp; call only where the CPU has AVX2).
uint64_t read_sum_portable(const uint8_t* p, size_t n);
#if defined(__x86_64__) || defined(_M_X64)
uint64_t read_sum_avx2(const uint8_t* p, size_t n);
#endif

// Activation quantizers (portable; tier_ref.cpp).
void quantize_row_f32(const float* x, int n, void* dst);
void quantize_row_q8K(const float* x, int n, void* dst);
void quantize_row_q8_0(const float* x, int n, void* dst);
void quantize_row_q8K_q4(const float* x, int n, void* dst);
inline QuantizeFn quantizer(Act a) {
    switch (a) {
        case Act::F32: return quantize_row_f32;
        case Act::Q8K: return quantize_row_q8K;
        case Act::Q8_0: return quantize_row_q8_0;
        case Act::Q8K_Q4: return quantize_row_q8K_q4;
    }
    return nullptr;
}

}  // namespace cpu
}  // namespace hybrimoe
