// SIMD pieces shared by the AVX2 and AVX-512 tiers. NOT a normal header: it is included by
// tier_avx2.cpp / tier_avx512*.cpp AFTER their `#pragma GCC target(...)`, inside an anonymous
// namespace, so each translation unit gets its own copy compiled for its own ISA (internal
// linkage: the linker can never hand the AVX-512 copy to the AVX2 tier). Nothing from the
// standard library is instantiated here for the same reason.
//
// Macros set by the includer:
//   HM_AVX512  1: AVX-512 BW/VL available (byte masks for the Q5_0 high bits)
//   HM_VNNI    1: AVX-512 VNNI available (vpdpbusd / vpdpwssd)
//
// Q5_0 and Q8_0 blocks hold 32 weights: one ymm. Both tiers use 256-bit vectors for them (a zmm
// would straddle two blocks with two scales, and Zen 4 splits zmm ops in two anyway).

#define HM_INLINE inline __attribute__((always_inline))

// --------------------------------------------------------------------------- small helpers ---

HM_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

HM_INLINE float fp16(half_bits h) { return _cvtsh_ss(h); }

// sum over groups of 4 of u8 * s8 -> 8 x int32 (u: unsigned weights, s: signed activations).
// Without VNNI: maddubs (pairs -> int16; no saturation: |u| <= 128, |s| <= 127) then madd by 1.
HM_INLINE __m256i dot_u8s8_256(__m256i u, __m256i s) {
#if HM_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Run a tile kernel K::tile<nt> for nt = 1..N chosen at run time.
template <class K, int N>
HM_INLINE void tile_dispatch(int nt, const uint8_t* wr, int i0, int i1, const void* const* x, float* out) {
    if (nt == N) {
        K::template tile<N>(wr, i0, i1, x, out);
    } else if constexpr (N > 1) {
        tile_dispatch<K, N - 1>(nt, wr, i0, i1, x, out);
    }
}

// Activation bytes of one token tile kept in L1 while every row of the chunk passes over it:
// with Mixtral's down rows (14336 wide) a tile of 8 tokens is 131 KiB, which spilled to L2 and
// cost 2x per token. 24 KiB of the 32 KiB L1D: a DSv2-Lite gate tile (8 tokens x 8 blocks of
// 292 B = 18.7 KiB) then runs as one chunk, one reduction per row and token instead of two:
// 5-8% faster prefill than 16 KiB on Zen 4 (Q4_K 1408x2048, 64 and 512 tokens, 1 thread).
constexpr int L1_ACT_BYTES = 24 << 10;

// The RowsFn contract of cpu_kernels.h. Loops: token tiles of up to NTMAX (outer), column
// chunks whose activations fit L1_ACT_BYTES, rows (inner). K: tile kernel with BLOCK (weights
// per block) and ACT_BYTES (activation bytes per block).
template <class K, int NTMAX>
void rows_tiled(const uint8_t* w, size_t row_bytes, int cols, int r0, int r1, const void* const* x, int T,
                float* y, size_t ldy) {
    const int nb = cols / K::BLOCK;
    for (int t0 = 0; t0 < T; t0 += NTMAX) {
        const int nt = T - t0 < NTMAX ? T - t0 : NTMAX;
        int kc = L1_ACT_BYTES / (nt * K::ACT_BYTES);
        kc = kc < 1 ? 1 : kc;
        // equal chunks: 8 blocks in chunks of at most 7 run as 4 + 4, not 7 + 1 (each chunk
        // costs a reduction per row and token)
        const int n_chunks = (nb + kc - 1) / kc;
        kc = (nb + n_chunks - 1) / n_chunks;
        for (int k0 = 0; k0 < nb; k0 += kc) {
            const int k1 = nb - k0 < kc ? nb : k0 + kc;
            for (int r = r0; r < r1; ++r) {
                float out[NTMAX];
                tile_dispatch<K, NTMAX>(nt, w + (size_t)r * row_bytes, k0, k1, x + t0, out);
                float* yr = y + (size_t)t0 * ldy + (r - r0);
                if (k0 == 0) {
                    for (int t = 0; t < nt; ++t) yr[(size_t)t * ldy] = out[t];
                } else {
                    for (int t = 0; t < nt; ++t) yr[(size_t)t * ldy] += out[t];
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------ Q5_0 ---

// 32 weights of a Q5_0 block as unsigned bytes 0..31, in element order.
HM_INLINE __m256i unpack_q5_0(const block_q5_0& b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
    uint32_t qh;
    memcpy(&qh, b.qh, 4);
#if HM_AVX512
    q = _mm256_mask_add_epi8(q, (__mmask32)qh, q, _mm256_set1_epi8(0x10));
#else
    // Spread bit l of qh to byte l: replicate byte l/8 into byte l, test bit l%8.
    const __m256i rep = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)qh),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(rep, bit), bit);
    q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
#endif
    return q;
}

struct KQ5_0 {
    static constexpr int BLOCK = QK5_0, ACT_BYTES = (int)sizeof(block_q8_0_act);
    template <int NT>
    static HM_INLINE void tile(const uint8_t* wr, int i0, int i1, const void* const* x, float* out) {
        const block_q5_0* b = reinterpret_cast<const block_q5_0*>(wr);
        __m256 acc[NT];
        float off[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), off[t] = 0.f;
        for (int i = i0; i < i1; ++i) {
            const __m256i q = unpack_q5_0(b[i]);
            const float d = fp16(b[i].d);
            for (int t = 0; t < NT; ++t) {
                const block_q8_0_act& a = static_cast<const block_q8_0_act*>(x[t])[i];
                const __m256i p = dot_u8s8_256(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a.d), acc[t]);
                off[t] += d * a.s;
            }
        }
        for (int t = 0; t < NT; ++t) out[t] = hsum256(acc[t]) - 16.f * off[t];
    }
};

// ------------------------------------------------------------------------------------ Q8_0 ---

struct KQ8_0 {
    static constexpr int BLOCK = QK8_0, ACT_BYTES = (int)sizeof(block_q8_0_act);
    template <int NT>
    static HM_INLINE void tile(const uint8_t* wr, int i0, int i1, const void* const* x, float* out) {
        const block_q8_0* b = reinterpret_cast<const block_q8_0*>(wr);
        __m256 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
        for (int i = i0; i < i1; ++i) {
            // signed x signed via |w| (unsigned) * (x with w's sign)
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[i].qs));
            const __m256i aw = _mm256_abs_epi8(w);
            const float d = fp16(b[i].d);
            for (int t = 0; t < NT; ++t) {
                const block_q8_0_act& a = static_cast<const block_q8_0_act*>(x[t])[i];
                const __m256i s = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs)), w);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8_256(aw, s)), _mm256_set1_ps(d * a.d), acc[t]);
            }
        }
        for (int t = 0; t < NT; ++t) out[t] = hsum256(acc[t]);
    }
};
