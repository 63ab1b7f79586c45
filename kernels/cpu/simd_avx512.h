// AVX-512 tier kernels (F/BW/VL/DQ, optionally VNNI). NOT a normal header: included twice, by
// tier_avx512.cpp (HM_VNNI 0) and tier_avx512_vnni.cpp (HM_VNNI 1), after their target pragma
// and inside an anonymous namespace; see simd_common.h for why.
//
// K-quants use zmm: 64 weights per vector. Q4_K: one 64-byte load holds the nibbles of 128
// weights; the activations are stored in that nibble order (Act::Q8K_Q4), so they are plain
// contiguous loads, shared by every token of a tile. Per-sub-block scales are applied in int16
// (maddubs -> vpdpwssd / madd by a scale vector), one float FMA per super-block and token, plus
// an 8-wide one for the Q4_K mins.

#include "simd_common.h"

// zmm whose four 128-bit lanes hold int16 values v0..v3 (each repeated 8 times).
HM_INLINE __m512i lanes16(int v0, int v1, int v2, int v3) {
    const int k = 0x10001;
    return _mm512_set_epi32(v3 * k, v3 * k, v3 * k, v3 * k, v2 * k, v2 * k, v2 * k, v2 * k, v1 * k, v1 * k, v1 * k,
                            v1 * k, v0 * k, v0 * k, v0 * k, v0 * k);
}

// out[t] = sum of the 16 lanes of acc[t], t < NT. For a full tile of 8 one transposing add tree
// (24 shuffles and adds) instead of 8 separate reductions (~64): every row pass over a column
// chunk ends with it, and a DSv2-Lite Q4_K row pass of 8 blocks x 8 tokens is only ~800 ops.
template <int NT>
HM_INLINE void reduce_tile(const __m512* acc, float* out) {
    if constexpr (NT == 8) {
        __m512 r[4];
        for (int k = 0; k < 4; ++k)  // 128-bit lanes 0-1: token 2k, 2-3: token 2k+1 (8 partials each)
            r[k] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], 0x44),
                                 _mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], 0xEE));
        __m512 q[2];
        for (int j = 0; j < 2; ++j)  // 128-bit lane L: token 4j + L (4 partials)
            q[j] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * j], r[2 * j + 1], 0x88),
                                 _mm512_shuffle_f32x4(r[2 * j], r[2 * j + 1], 0xDD));
        __m512 h = _mm512_add_ps(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
        h = _mm512_add_ps(h, _mm512_permute_ps(h, 0x4E));  // lane L: [token L, token 4 + L, ..]
        const __m512 o = _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 13, 9, 5, 1, 12, 8, 4, 0), h);
        _mm256_storeu_ps(out, _mm512_castps512_ps256(o));
    } else {
        for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
    }
}

// isum += sum over pairs of (int16 p) * (int16 s) -> 16 x int32
HM_INLINE __m512i dot_i16_acc(__m512i isum, __m512i p, __m512i s) {
#if HM_VNNI
    return _mm512_dpwssd_epi32(isum, p, s);
#else
    return _mm512_add_epi32(isum, _mm512_madd_epi16(p, s));
#endif
}

struct KQ4_K_512 {
    static constexpr int BLOCK = QK_K, ACT_BYTES = (int)sizeof(block_q8_K4_act);
    template <int NT>
    static HM_INLINE void tile(const uint8_t* wr, int i0, int i1, const void* const* x, float* out) {
        const block_q4_K* b = reinterpret_cast<const block_q4_K*>(wr);
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        // activations in Act::Q8K_Q4 order: zmm k of a block pairs with sub-blocks (0,2), (1,3),
        // (4,6), (5,7) = the low / high nibbles of one 64-byte load.
        const __m512i i02 = lanes16(0, 0, 2, 2), i13 = lanes16(1, 1, 3, 3);
        const __m512i i46 = lanes16(4, 4, 6, 6), i57 = lanes16(5, 5, 7, 7);
        // Per token: acc = sum over blocks of d*da * (int dot scaled by sc, 16 lanes), and the
        // min term accm = sum over blocks of (dmin*m_j) * (da*asum_j), 8 lanes, in float.
        __m512 acc[NT];
        __m256 accm[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps(), accm[t] = _mm256_setzero_ps();
        for (int i = i0; i < i1; ++i) {
            uint64_t sc, mn;
            unpack_scales_mins_k4_u64(b[i].scales, &sc, &mn);
            const __m512i scz = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)sc)));
            const __m512i s0 = _mm512_permutexvar_epi16(i02, scz), s1 = _mm512_permutexvar_epi16(i13, scz);
            const __m512i s2 = _mm512_permutexvar_epi16(i46, scz), s3 = _mm512_permutexvar_epi16(i57, scz);
            const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(fp16(b[i].dmin)),
                                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn))));
            const __m512 dv = _mm512_set1_ps(fp16(b[i].d));

            const __m512i q0 = _mm512_loadu_si512(b[i].qs), q1 = _mm512_loadu_si512(b[i].qs + 64);
            const __m512i w0 = _mm512_and_si512(q0, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
            const __m512i w2 = _mm512_and_si512(q1, m4), w3 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
            for (int t = 0; t < NT; ++t) {
                const block_q8_K4_act& a = static_cast<const block_q8_K4_act*>(x[t])[i];
                __m512i isum = _mm512_madd_epi16(_mm512_maddubs_epi16(w0, _mm512_loadu_si512(a.qs)), s0);
                isum = dot_i16_acc(isum, _mm512_maddubs_epi16(w1, _mm512_loadu_si512(a.qs + 64)), s1);
                isum = dot_i16_acc(isum, _mm512_maddubs_epi16(w2, _mm512_loadu_si512(a.qs + 128)), s2);
                isum = dot_i16_acc(isum, _mm512_maddubs_epi16(w3, _mm512_loadu_si512(a.qs + 192)), s3);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dv, _mm512_set1_ps(a.d)), acc[t]);
                accm[t] = _mm256_fmadd_ps(dm, _mm256_loadu_ps(a.dsums), accm[t]);
            }
        }
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_sub_ps(acc[t], _mm512_zextps256_ps512(accm[t]));
        reduce_tile<NT>(acc, out);
    }
};

struct KQ6_K_512 {
    static constexpr int BLOCK = QK_K, ACT_BYTES = (int)sizeof(block_q8_K_act);
    template <int NT>
    static HM_INLINE void tile(const uint8_t* wr, int i0, int i1, const void* const* x, float* out) {
        const block_q6_K* b = reinterpret_cast<const block_q6_K*>(wr);
        const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
        // qh bits 0-1 -> 4-5 (elems 0..31 of the half), bits 2-3 -> 4-5 (32..63); B: 4-5, 6-7.
        const __m512i shA = lanes16(4, 4, 2, 2), shB = lanes16(0, 0, 2, 2);
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        for (int i = i0; i < i1; ++i) {
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[i].scales)));
            const __m512i scz = _mm512_castsi256_si512(sc16);
            // The whole super-block unpacked once (4 weight + 4 scale vectors), then one int32
            // sum live per token: keeps NT=8 tiles within the 32 zmm registers.
            __m512i w[4], s[4];
            for (int h = 0; h < 2; ++h) {
                const __m512i ql = _mm512_loadu_si512(b[i].ql + 64 * h);
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qh + 32 * h)));
                w[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_sllv_epi16(qh, shA), m30));
                w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                               _mm512_and_si512(_mm512_srlv_epi16(qh, shB), m30));
                s[2 * h] = _mm512_permutexvar_epi16(lanes16(8 * h, 8 * h + 1, 8 * h + 2, 8 * h + 3), scz);
                s[2 * h + 1] = _mm512_permutexvar_epi16(lanes16(8 * h + 4, 8 * h + 5, 8 * h + 6, 8 * h + 7), scz);
            }
            const float d = fp16(b[i].d);
            for (int t = 0; t < NT; ++t) {
                const block_q8_K_act& a = static_cast<const block_q8_K_act*>(x[t])[i];
                // the -32 offset, in int32: - 32 * sum_j sc_j * bsum_j
                const __m256i off = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums)), sc16), 5);
                __m512i isum = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(off));
                for (int k = 0; k < 4; ++k)
                    isum = dot_i16_acc(isum, _mm512_maddubs_epi16(w[k], _mm512_loadu_si512(a.qs + 64 * k)), s[k]);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * a.d), acc[t]);
            }
        }
        reduce_tile<NT>(acc, out);
    }
};

// 8 tokens per tile: 8 zmm accumulators + 4 unpacked weight vectors + 4 scale vectors fit the 32
// registers (NT=8 vs 4: see microbench/cpu_kernels.py prefill rows).
constexpr int NT_512 = 8;

// The AVX-512 tier's kernel table, written once; each file that includes this header builds it
// from its own ISA's instantiations (tier_avx512.cpp without VNNI, tier_avx512_vnni.cpp with).
const TierOps& avx512_table() {
    static const TierOps ops = {
        "avx512",
        {rows_tiled<KQ4_K_512, NT_512>, rows_tiled<KQ6_K_512, NT_512>, rows_tiled<KQ5_0, NT_512>,
         rows_tiled<KQ8_0, NT_512>},
        {Act::Q8K_Q4, Act::Q8K, Act::Q8_0, Act::Q8_0},
    };
    return ops;
}
