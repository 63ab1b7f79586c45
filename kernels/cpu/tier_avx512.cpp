// AVX-512 tier without VNNI (Skylake-X / Cascade Lake class: F/BW/VL/DQ): maddubs + madd.
// The kernels are in simd_avx512.h, shared with tier_avx512_vnni.cpp. Also the float-activation
// Q4_K kernel kept to measure the activation-path decision (see microbench/cpu_kernels.py).
#if defined(__x86_64__) || defined(_M_X64)

#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "blocks.h"
#include "cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq")

namespace hybrimoe {
namespace cpu {
namespace {
using std::memcpy;
#define HM_AVX512 1
#define HM_VNNI 0
#include "simd_avx512.h"

// Q4_K row . float activations: dequantize 16 weights at a time to fp32 (w = d*sc*q - dmin*m)
// and FMA with x. The alternative to quantizing activations; measured, not used by the tiers.
HM_INLINE float q4k_dot_f32(const block_q4_K* b, int nb, const float* x) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < nb; ++i, x += QK_K) {
        uint8_t sc[8], mn[8];
        unpack_scales_mins_k4(b[i].scales, sc, mn);
        const float d = fp16(b[i].d), dmin = fp16(b[i].dmin);
        for (int c = 0; c < 4; ++c) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qs + 32 * c));
            const __m256i nib[2] = {_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16(q, 4), m4)};
            for (int s = 0; s < 2; ++s) {
                const int j = 2 * c + s;
                const __m512 ds = _mm512_set1_ps(d * sc[j]), dm = _mm512_set1_ps(dmin * mn[j]);
                const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(nib[s])));
                const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(nib[s], 1)));
                acc = _mm512_fmadd_ps(_mm512_fmsub_ps(q0, ds, dm), _mm512_loadu_ps(x + 32 * j), acc);
                acc = _mm512_fmadd_ps(_mm512_fmsub_ps(q1, ds, dm), _mm512_loadu_ps(x + 32 * j + 16), acc);
            }
        }
    }
    return _mm512_reduce_add_ps(acc);
}

void q4k_rows_f32act_impl(const uint8_t* w, size_t row_bytes, int cols, int r0, int r1, const void* const* x,
                          int T, float* y, size_t ldy) {
    for (int r = r0; r < r1; ++r)
        for (int t = 0; t < T; ++t)
            y[(size_t)t * ldy + (r - r0)] = q4k_dot_f32(reinterpret_cast<const block_q4_K*>(w + (size_t)r * row_bytes),
                                                        cols / QK_K, static_cast<const float*>(x[t]));
}
}  // namespace

#pragma GCC pop_options

void q4k_rows_f32act_avx512(const uint8_t* w, size_t row_bytes, int cols, int r0, int r1, const void* const* x,
                            int T, float* y, size_t ldy) {
    q4k_rows_f32act_impl(w, row_bytes, cols, r0, r1, x, T, y, ldy);
}

const TierOps& avx512_ops() {
    return avx512_table();
}

}  // namespace cpu
}  // namespace hybrimoe

#endif  // x86-64
