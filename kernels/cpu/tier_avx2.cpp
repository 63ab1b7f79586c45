// Generic tier, x86 part: AVX2 + FMA + F16C, integer dot products on int8 activations
// (maddubs + madd). Chosen at run time only when the CPU has AVX2/FMA/F16C; the scalar twin of
// every kernel here is in tier_ref.cpp (generic scalar).
#if defined(__x86_64__) || defined(_M_X64)

// Everything from outside is included before the target pragma (see simd_common.h).
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "blocks.h"
#include "cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")

namespace hybrimoe {
namespace cpu {
namespace {

using std::memcpy;
#define HM_AVX512 0
#define HM_VNNI 0
#include "simd_common.h"

// Q4_K: 4 chunks of 32 bytes; low nibbles = sub-block 2c, high = 2c+1, each one ymm.
struct KQ4_K {
    static constexpr int BLOCK = QK_K, ACT_BYTES = (int)sizeof(block_q8_K_act);
    template <int NT>
    static HM_INLINE void tile(const uint8_t* wr, int i0, int i1, const void* const* x, float* out) {
        const block_q4_K* b = reinterpret_cast<const block_q4_K*>(wr);
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        __m256 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
        for (int i = i0; i < i1; ++i) {
            uint64_t scw, mnw;
            unpack_scales_mins_k4_u64(b[i].scales, &scw, &mnw);
            // the 8 sub-block scales in every 64-bit lane; a byte shuffle then spreads scale j as
            // int16 (one uop, no scalar extract + broadcast per sub-block)
            const __m256i scv = _mm256_set1_epi64x((long long)scw);
            // [m0,m0,m1,m1,...,m7,m7] as int16, to pair with the per-16 activation sums
            const __m256i m32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mnw));
            const __m256i mins = _mm256_or_si256(m32, _mm256_slli_epi32(m32, 16));
            __m256i isum[NT];
            for (int t = 0; t < NT; ++t) isum[t] = _mm256_setzero_si256();
            for (int c = 0; c < 4; ++c) {
                const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qs + 32 * c));
                const __m256i lo = _mm256_and_si256(q, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                const __m256i slo = _mm256_shuffle_epi8(scv, _mm256_set1_epi16((short)(0x8000 | (2 * c))));
                const __m256i shi = _mm256_shuffle_epi8(scv, _mm256_set1_epi16((short)(0x8000 | (2 * c + 1))));
                for (int t = 0; t < NT; ++t) {
                    const int8_t* xq = static_cast<const block_q8_K_act*>(x[t])[i].qs + 64 * c;
                    const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
                    const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(_mm256_madd_epi16(plo, slo), _mm256_madd_epi16(phi, shi)));
                }
            }
            const float d = fp16(b[i].d), dmin = fp16(b[i].dmin);
            for (int t = 0; t < NT; ++t) {
                const block_q8_K_act& a = static_cast<const block_q8_K_act*>(x[t])[i];
                const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums));
                const __m256i msum = _mm256_madd_epi16(bs, mins);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * a.d), acc[t]);
                acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin * a.d), acc[t]);
            }
        }
        for (int t = 0; t < NT; ++t) out[t] = hsum256(acc[t]);
    }
};

// Q6_K: per half h and group k of 32: low 4 bits from ql (k even: low nibbles, odd... see
// tier_ref.cpp dequant_row_q6_K), 2 high bits from qh >> 2k. Two 16-wide sub-blocks per group.
struct KQ6_K {
    static constexpr int BLOCK = QK_K, ACT_BYTES = (int)sizeof(block_q8_K_act);
    template <int NT>
    static HM_INLINE void tile(const uint8_t* wr, int i0, int i1, const void* const* x, float* out) {
        const block_q6_K* b = reinterpret_cast<const block_q6_K*>(wr);
        const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
        __m256 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
        for (int i = i0; i < i1; ++i) {
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[i].scales)));
            __m256i isum[NT];
            for (int t = 0; t < NT; ++t) {
                // -32 offset: sum_j sc_j * 32 * bsum_j, subtracted in int32
                const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const block_q8_K_act*>(x[t])[i].bsums));
                isum[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5));
            }
            for (int h = 0; h < 2; ++h) {
                // the 8 int16 scales of this half in both 128-bit lanes; per group k a byte shuffle
                // puts scale 2k in lane 0 and 2k+1 in lane 1 (no scalar extracts + broadcasts)
                const __m256i sch = _mm256_permute4x64_epi64(sc16, h ? 0xEE : 0x44);
                const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].ql + 64 * h));
                const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].ql + 64 * h + 32));
                const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qh + 32 * h));
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
                q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                       _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
                for (int k = 0; k < 4; ++k) {
                    // lane 0: scale 8h+2k (bytes 4k, 4k+1 of the half), lane 1: scale 8h+2k+1
                    const __m256i s = _mm256_shuffle_epi8(
                        sch, _mm256_set_m128i(_mm_set1_epi16((short)(((4 * k + 3) << 8) | (4 * k + 2))),
                                              _mm_set1_epi16((short)(((4 * k + 1) << 8) | (4 * k)))));
                    for (int t = 0; t < NT; ++t) {
                        const int8_t* xq = static_cast<const block_q8_K_act*>(x[t])[i].qs + 128 * h + 32 * k;
                        const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, s));
                    }
                }
            }
            const float d = fp16(b[i].d);
            for (int t = 0; t < NT; ++t) {
                const float da = d * static_cast<const block_q8_K_act*>(x[t])[i].d;
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(da), acc[t]);
            }
        }
        for (int t = 0; t < NT; ++t) out[t] = hsum256(acc[t]);
    }
};

// 4 tokens per tile: 16 ymm registers hold 4 accumulators + 4 int sums + the unpacked weights.
constexpr int NT_AVX2 = 4;

}  // namespace

// Streaming read of n bytes (the read ceiling of microbench/cpu_kernels.py): four independent
// 64-bit lane sums over 128 bytes a step, so the loads, not the adds, set the pace.
uint64_t read_sum_avx2(const uint8_t* p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
    }
    const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t l[4];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(l), s);
    uint64_t r = l[0] + l[1] + l[2] + l[3];
    for (; i < n; ++i) r += p[i];
    return r;
}

// Back to the baseline ISA: this function runs before any CPU check could protect it.
#pragma GCC pop_options

const TierOps& generic_avx2_ops() {
    static const TierOps ops = {
        "generic",
        {rows_tiled<KQ4_K, NT_AVX2>, rows_tiled<KQ6_K, NT_AVX2>, rows_tiled<KQ5_0, NT_AVX2>,
         rows_tiled<KQ8_0, NT_AVX2>},
        {Act::Q8K, Act::Q8K, Act::Q8_0, Act::Q8_0},
    };
    return ops;
}

}  // namespace cpu
}  // namespace hybrimoe

#endif  // x86-64
