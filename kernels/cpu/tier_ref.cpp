// Portable tiers, plain C++:
//   ref:            dequantize a row to float, dot with float activations (double accumulator).
//                   The readable twin of every SIMD kernel; slow on purpose.
//   generic scalar: the integer scheme of the SIMD tiers (int8 activations, integer block dots,
//                   one float multiply per block) written as scalar loops; the generic tier's
//                   fallback where AVX2 is absent, and the model the SIMD code follows.
// Also the activation quantizers shared by all integer tiers.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "blocks.h"
#include "cpu_kernels.h"

namespace hybrimoe {
namespace cpu {

// ---------------------------------------------------------------- dequantize one row (ref) ----

static void dequant_row_q4_K(const uint8_t* src, int n, float* y) {
    const block_q4_K* b = reinterpret_cast<const block_q4_K*>(src);
    for (int i = 0; i < n / QK_K; ++i, y += QK_K) {
        const float d = half_to_float(b[i].d), dmin = half_to_float(b[i].dmin);
        for (int j = 0; j < 8; ++j) {
            uint8_t sc, m;
            get_scale_min_k4(j, b[i].scales, &sc, &m);
            const uint8_t* q = b[i].qs + 32 * (j / 2);  // sub-blocks 2c, 2c+1 share 32 bytes
            const int shift = 4 * (j & 1);
            for (int l = 0; l < 32; ++l) y[32 * j + l] = d * sc * ((q[l] >> shift) & 0xF) - dmin * m;
        }
    }
}

static void dequant_row_q6_K(const uint8_t* src, int n, float* y) {
    const block_q6_K* b = reinterpret_cast<const block_q6_K*>(src);
    for (int i = 0; i < n / QK_K; ++i, y += QK_K) {
        const float d = half_to_float(b[i].d);
        for (int h = 0; h < 2; ++h) {  // two halves of 128
            for (int l = 0; l < 32; ++l) {
                int q[4];
                q6k_quants(b[i], h, l, q);
                for (int k = 0; k < 4; ++k) {
                    const int e = 128 * h + 32 * k + l;
                    y[e] = d * b[i].scales[e / 16] * (q[k] - 32);
                }
            }
        }
    }
}

static void dequant_row_q5_0(const uint8_t* src, int n, float* y) {
    const block_q5_0* b = reinterpret_cast<const block_q5_0*>(src);
    for (int i = 0; i < n / QK5_0; ++i, y += QK5_0) {
        const float d = half_to_float(b[i].d);
        uint32_t qh;
        std::memcpy(&qh, b[i].qh, 4);
        for (int l = 0; l < 16; ++l) {
            y[l] = d * ((int)((b[i].qs[l] & 0xF) | (((qh >> l) & 1) << 4)) - 16);
            y[l + 16] = d * ((int)((b[i].qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) - 16);
        }
    }
}

static void dequant_row_q8_0(const uint8_t* src, int n, float* y) {
    const block_q8_0* b = reinterpret_cast<const block_q8_0*>(src);
    for (int i = 0; i < n / QK8_0; ++i, y += QK8_0) {
        const float d = half_to_float(b[i].d);
        for (int l = 0; l < 32; ++l) y[l] = d * b[i].qs[l];
    }
}

template <void (*Dequant)(const uint8_t*, int, float*)>
static void ref_rows(const uint8_t* w, size_t row_bytes, int cols, int r0, int r1, const void* const* x,
                     int T, float* y, size_t ldy) {
    thread_local std::vector<float> row;
    row.resize((size_t)cols);
    for (int r = r0; r < r1; ++r) {
        Dequant(w + (size_t)r * row_bytes, cols, row.data());
        for (int t = 0; t < T; ++t) {
            const float* xt = static_cast<const float*>(x[t]);
            double s = 0.0;
            for (int k = 0; k < cols; ++k) s += (double)row[k] * xt[k];
            y[(size_t)t * ldy + (r - r0)] = (float)s;
        }
    }
}

// ------------------------------------------------------------------ activation quantizers ----

void quantize_row_f32(const float* x, int n, void* dst) { std::memcpy(dst, x, sizeof(float) * (size_t)n); }

// Nearest integer (ties to even) for |v| <= 2^22, via the float adder: v + 1.5*2^23 has the
// rounded integer in its low mantissa bits. Unlike lround (a libm call, ~20 ns) this compiles
// to vector code with the baseline ISA; quantizing activations was 20-40% of a GEMV with lround.
static inline int32_t nearest_int(float v) {
    const float t = v + 12582912.f;
    int32_t i;
    std::memcpy(&i, &t, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline float abs_max(const float* x, int n) {
    float amax = 0.f;
    for (int l = 0; l < n; ++l) {
        const float a = x[l] < 0.f ? -x[l] : x[l];
        amax = amax > a ? amax : a;
    }
    return amax;
}

void quantize_row_q8K(const float* x, int n, void* dst) {
    block_q8_K_act* b = static_cast<block_q8_K_act*>(dst);
    for (int i = 0; i < n / QK_K; ++i, x += QK_K) {
        const float amax = abs_max(x, QK_K);
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        b[i].d = amax / 127.f;
        for (int l = 0; l < QK_K; ++l) b[i].qs[l] = (int8_t)nearest_int(x[l] * id);
        for (int g = 0; g < QK_K / 16; ++g) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += b[i].qs[16 * g + l];
            b[i].bsums[g] = (int16_t)s;
        }
    }
}

void quantize_row_q8K_q4(const float* x, int n, void* dst) {
    block_q8_K4_act* b = static_cast<block_q8_K4_act*>(dst);
    for (int i = 0; i < n / QK_K; ++i, x += QK_K) {
        const float amax = abs_max(x, QK_K);
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        const float d = amax / 127.f;
        int8_t q[QK_K];
        for (int l = 0; l < QK_K; ++l) q[l] = (int8_t)nearest_int(x[l] * id);
        b[i].d = d;
        for (int j = 0; j < QK_K / 32; ++j) {
            int s = 0;
            for (int l = 0; l < 32; ++l) s += q[32 * j + l];
            b[i].dsums[j] = d * (float)s;
        }
        for (int h = 0; h < 2; ++h)
            for (int c = 0; c < 4; ++c)  // element quarter c of half h -> slot {0, 2, 1, 3}[c]
                std::memcpy(b[i].qs + 128 * h + 32 * ((c & 1) * 2 + (c >> 1)), q + 128 * h + 32 * c, 32);
    }
}

void quantize_row_q8_0(const float* x, int n, void* dst) {
    block_q8_0_act* b = static_cast<block_q8_0_act*>(dst);
    for (int i = 0; i < n / QK8_0; ++i, x += QK8_0) {
        const float amax = abs_max(x, QK8_0);
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        const float d = amax / 127.f;
        int s = 0;
        for (int l = 0; l < QK8_0; ++l) {
            b[i].qs[l] = (int8_t)nearest_int(x[l] * id);
            s += b[i].qs[l];
        }
        b[i].d = d;
        b[i].s = d * (float)s;
    }
}

// ------------------------------------------------------ generic scalar integer dot products ----

static float dot_q4_K_scalar(const uint8_t* src, int n, const void* xv) {
    const block_q4_K* b = reinterpret_cast<const block_q4_K*>(src);
    const block_q8_K_act* a = static_cast<const block_q8_K_act*>(xv);
    float sum = 0.f;
    for (int i = 0; i < n / QK_K; ++i) {
        uint8_t sc[8], m[8];
        unpack_scales_mins_k4(b[i].scales, sc, m);
        int32_t isum = 0, imin = 0;
        for (int j = 0; j < 8; ++j) {
            const uint8_t* q = b[i].qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            int32_t s = 0;
            for (int l = 0; l < 32; ++l) s += ((q[l] >> shift) & 0xF) * a[i].qs[32 * j + l];
            isum += sc[j] * s;
            imin += m[j] * (a[i].bsums[2 * j] + a[i].bsums[2 * j + 1]);
        }
        sum += a[i].d * (half_to_float(b[i].d) * isum - half_to_float(b[i].dmin) * imin);
    }
    return sum;
}

static float dot_q6_K_scalar(const uint8_t* src, int n, const void* xv) {
    const block_q6_K* b = reinterpret_cast<const block_q6_K*>(src);
    const block_q8_K_act* a = static_cast<const block_q8_K_act*>(xv);
    float sum = 0.f;
    for (int i = 0; i < n / QK_K; ++i) {
        int32_t sub[16] = {0};  // per 16-element sub-block: sum q * x (q unsigned 0..63)
        for (int h = 0; h < 2; ++h) {
            for (int l = 0; l < 32; ++l) {
                int q[4];
                q6k_quants(b[i], h, l, q);
                for (int k = 0; k < 4; ++k) {
                    const int e = 128 * h + 32 * k + l;
                    sub[e / 16] += q[k] * a[i].qs[e];
                }
            }
        }
        int32_t isum = 0;
        for (int j = 0; j < 16; ++j) isum += b[i].scales[j] * (sub[j] - 32 * a[i].bsums[j]);
        sum += a[i].d * half_to_float(b[i].d) * isum;
    }
    return sum;
}

static float dot_q5_0_scalar(const uint8_t* src, int n, const void* xv) {
    const block_q5_0* b = reinterpret_cast<const block_q5_0*>(src);
    const block_q8_0_act* a = static_cast<const block_q8_0_act*>(xv);
    float sum = 0.f;
    for (int i = 0; i < n / QK5_0; ++i) {
        uint32_t qh;
        std::memcpy(&qh, b[i].qh, 4);
        int32_t s = 0;
        for (int l = 0; l < 16; ++l) {
            s += (int)((b[i].qs[l] & 0xF) | (((qh >> l) & 1) << 4)) * a[i].qs[l];
            s += (int)((b[i].qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) * a[i].qs[l + 16];
        }
        const float d = half_to_float(b[i].d);
        sum += d * (a[i].d * s - 16.f * a[i].s);  // q - 16 folded into the activation sum
    }
    return sum;
}

static float dot_q8_0_scalar(const uint8_t* src, int n, const void* xv) {
    const block_q8_0* b = reinterpret_cast<const block_q8_0*>(src);
    const block_q8_0_act* a = static_cast<const block_q8_0_act*>(xv);
    float sum = 0.f;
    for (int i = 0; i < n / QK8_0; ++i) {
        int32_t s = 0;
        for (int l = 0; l < 32; ++l) s += b[i].qs[l] * a[i].qs[l];
        sum += half_to_float(b[i].d) * a[i].d * s;
    }
    return sum;
}

template <float (*Dot)(const uint8_t*, int, const void*)>
static void scalar_rows(const uint8_t* w, size_t row_bytes, int cols, int r0, int r1, const void* const* x,
                        int T, float* y, size_t ldy) {
    for (int r = r0; r < r1; ++r)
        for (int t = 0; t < T; ++t) y[(size_t)t * ldy + (r - r0)] = Dot(w + (size_t)r * row_bytes, cols, x[t]);
}

const TierOps& ref_ops() {
    static const TierOps ops = {
        "ref",
        {ref_rows<dequant_row_q4_K>, ref_rows<dequant_row_q6_K>, ref_rows<dequant_row_q5_0>,
         ref_rows<dequant_row_q8_0>},
        {Act::F32, Act::F32, Act::F32, Act::F32},
    };
    return ops;
}

const TierOps& generic_scalar_ops() {
    static const TierOps ops = {
        "generic",
        {scalar_rows<dot_q4_K_scalar>, scalar_rows<dot_q6_K_scalar>, scalar_rows<dot_q5_0_scalar>,
         scalar_rows<dot_q8_0_scalar>},
        {Act::Q8K, Act::Q8K, Act::Q8_0, Act::Q8_0},
    };
    return ops;
}

uint64_t read_sum_portable(const uint8_t* p, size_t n) {
    uint64_t a[4] = {0, 0, 0, 0};
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int k = 0; k < 4; ++k) {
            uint64_t v;
            std::memcpy(&v, p + i + 8 * k, 8);
            a[k] += v;
        }
    }
    for (; i < n; ++i) a[0] += p[i];
    return a[0] + a[1] + a[2] + a[3];
}

}  // namespace cpu
}  // namespace hybrimoe
