// GGUF block layouts for the four expert types of a Q4_K_M file, defined once for all C++/CUDA
// code. The Python twin is hybrimoe/formats.py (numpy structured dtypes with the same fields).
// Facts from llama.cpp's ggml-common.h; the code is ours.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HM_HD __host__ __device__ __forceinline__
#else
#define HM_HD inline
#endif

namespace hybrimoe {

constexpr int QK_K = 256;         // weights per super-block (Q4_K, Q6_K)
constexpr int K_SCALE_SIZE = 12;  // bytes of packed 6-bit scales/mins in Q4_K
constexpr int QK5_0 = 32;         // weights per Q5_0 block
constexpr int QK8_0 = 32;         // weights per Q8_0 block

using half_bits = uint16_t;       // IEEE fp16 stored as raw bits

// Q4_K: 8 sub-blocks of 32; w = d*sc[j]*q - dmin*m[j], q in 0..15, sc/m 6-bit.
struct block_q4_K {
    half_bits d;                  // super-block scale for the 6-bit scales
    half_bits dmin;               // super-block scale for the 6-bit mins
    uint8_t scales[K_SCALE_SIZE]; // 8 scales + 8 mins, 6 bits each, packed (see get_scale_min_k4)
    uint8_t qs[QK_K / 2];         // 4-bit quants: byte l of chunk c holds elems 64c+l (low) and 64c+32+l (high)
};
// Q6_K: 16 sub-blocks of 16; w = d*scales[j]*(q-32), q 6-bit (4 low bits in ql, 2 high in qh).
struct block_q6_K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    half_bits d;
};
// Q5_0: w = d*(q-16), q 5-bit: low nibbles in qs (elem l low, elem l+16 high), 5th bits in qh.
struct block_q5_0 {
    half_bits d;
    uint8_t qh[4];
    uint8_t qs[QK5_0 / 2];
};
// Q8_0: w = d*q, q int8.
struct block_q8_0 {
    half_bits d;
    int8_t qs[QK8_0];
};

static_assert(sizeof(block_q4_K) == 144, "block_q4_K must be 144 bytes (GGUF layout)");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K must be 210 bytes (GGUF layout)");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must be 22 bytes (GGUF layout)");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must be 34 bytes (GGUF layout)");

// GGML type ids (gguf.GGMLQuantizationType) of the expert formats.
enum class QType : int { Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

// The one place the scalar Q6_K unpacking is written: the unsigned 6-bit quants (0..63) of
// elements 128h + 32k + l (k = 0..3) of block `b`, for half h (0..1) and lane l (0..31).
HM_HD void q6k_quants(const block_q6_K& b, int h, int l, int q[4]) {
    const uint8_t* ql = b.ql + 64 * h;
    const uint8_t* qh = b.qh + 32 * h;
    q[0] = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
    q[1] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
    q[2] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
    q[3] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
}

// The one place the Q4_K 6-bit scale/min unpacking is written in C++: sub-block j (0..7).
HM_HD void get_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// fp16 bits -> float, portable (no F16C needed), exact for all finite values, inf and nan.
HM_HD float half_to_float(half_bits h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) { mant <<= 1; --exp; }
            mant &= 0x3FF;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
#if defined(__CUDA_ARCH__)  // device pass only: the intrinsic does not exist on the host side
    f = __uint_as_float(bits);
#else
    std::memcpy(&f, &bits, sizeof(f));
#endif
    return f;
}

// Bytes and elements per block, by type id; 0 for types that are not expert formats here.
HM_HD int block_bytes(int qtype) {
    switch (qtype) {
        case (int)QType::Q4_K: return (int)sizeof(block_q4_K);
        case (int)QType::Q6_K: return (int)sizeof(block_q6_K);
        case (int)QType::Q5_0: return (int)sizeof(block_q5_0);
        case (int)QType::Q8_0: return (int)sizeof(block_q8_0);
        default: return 0;
    }
}
HM_HD int block_elems(int qtype) {
    switch (qtype) {
        case (int)QType::Q4_K: case (int)QType::Q6_K: return QK_K;
        case (int)QType::Q5_0: case (int)QType::Q8_0: return 32;
        default: return 0;
    }
}


// Bulk form of get_scale_min_k4 for all 8 sub-blocks at once, on 32-bit words (the same bit
// layout, read four bytes at a time; the SIMD tiers use it, the ref tier calls get_scale_min_k4,
// and the tier-vs-ref tests check they agree). q: the 12 scale bytes of a block_q4_K.
// Results as two little-endian u64 (byte j = sub-block j), so SIMD code can move them straight
// into a vector register (storing 4-byte halves and reloading 8 bytes defeats store forwarding).
HM_HD void unpack_scales_mins_k4_u64(const uint8_t* q, uint64_t* sc, uint64_t* m) {
    uint32_t a, b, c;
    std::memcpy(&a, q, 4);
    std::memcpy(&b, q + 4, 4);
    std::memcpy(&c, q + 8, 4);
    const uint32_t s03 = a & 0x3f3f3f3fu;                                     // sc[0..3]
    const uint32_t m03 = b & 0x3f3f3f3fu;                                     // m[0..3]
    const uint32_t s47 = (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4); // sc[4..7]
    const uint32_t m47 = ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4);
    *sc = (uint64_t)s03 | ((uint64_t)s47 << 32);
    *m = (uint64_t)m03 | ((uint64_t)m47 << 32);
}
HM_HD void unpack_scales_mins_k4(const uint8_t* q, uint8_t sc[8], uint8_t m[8]) {
    uint64_t s, n;
    unpack_scales_mins_k4_u64(q, &s, &n);
    std::memcpy(sc, &s, 8);
    std::memcpy(m, &n, 8);
}

// Activation blocks (ours, not GGUF): a token's activations quantized on the fly to int8 so the
// SIMD tiers can use integer dot products (maddubs / VNNI). Symmetric, |q| <= 127.
// For K-quant weights: one fp32 scale per 256, plus sums of each 16 quants (for the Q4_K mins
// and the Q6_K -32 offset).
struct block_q8_K_act {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
};
// For Q5_0 / Q8_0 weights: one fp32 scale per 32, and s = d * sum(qs) (for the Q5_0 -16 offset).
struct block_q8_0_act {
    float d;
    float s;
    int8_t qs[QK8_0];
};
// For Q4_K weights in the AVX-512 tier (Act::Q8K_Q4): qs in Q4_K nibble order (see
// cpu_kernels.h) and, instead of per-16 int sums, dsums[j] = d * (sum of the 32 quants of
// sub-block j, element order): the Q4_K min term then costs one 8-wide float FMA per block and
// token (dmin*m_j . dsums) instead of an int16 madd, a convert, a scale broadcast and an FMA.
struct block_q8_K4_act {
    float d;
    int8_t qs[QK_K];
    float dsums[QK_K / 32];
};
static_assert(sizeof(block_q8_K_act) == 292, "block_q8_K_act layout");
static_assert(sizeof(block_q8_K4_act) == 292, "block_q8_K4_act layout");
static_assert(sizeof(block_q8_0_act) == 40, "block_q8_0_act layout");

}  // namespace hybrimoe
