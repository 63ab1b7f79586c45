#include "attention.h"

#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HM_ATT_X86 1
#else
#define HM_ATT_X86 0
#endif

#include "pool.h"

namespace hybrimoe {
namespace cpu {
namespace {

// Dot product with 8 independent partial sums (vectorisable without -ffast-math).
inline float dot8(const float* a, const float* b, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

inline void axpy(float* y, float a, const float* x, int n) {
    for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

#if HM_ATT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// q . k over n floats: 4 independent 8-wide FMA chains.
float dot_avx2(const float* a, const float* b, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
}

// out[0, dv) = sum_s p[s] * v[s * vs + (0, dv)], 64 columns at a time in 8 registers.
void weighted_rows_avx2(const float* p, const float* v, int64_t vs, int S, int dv, float* out) {
    int c = 0;
    for (; c + 64 <= dv; c += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int s = 0; s < S; ++s) {
            const __m256 ps = _mm256_set1_ps(p[s]);
            const float* vr = v + s * vs + c;
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr + 8 * j), acc[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + c + 8 * j, acc[j]);
    }
    for (; c + 8 <= dv; c += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int s = 0; s < S; ++s) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), _mm256_loadu_ps(v + s * vs + c), acc);
        _mm256_storeu_ps(out + c, acc);
    }
    for (; c < dv; ++c) {
        float acc = 0.0f;
        for (int s = 0; s < S; ++s) acc += p[s] * v[s * vs + c];
        out[c] = acc;
    }
}
#pragma GCC pop_options
#endif

void weighted_rows(const float* p, const float* v, int64_t vs, int S, int dv, float* out) {
    for (int i = 0; i < dv; ++i) out[i] = 0.0f;
    for (int s = 0; s < S; ++s)
        if (p[s] != 0.0f) axpy(out, p[s], v + s * vs, dv);
}

}  // namespace

void attend_one(ThreadPool& pool, const AttendArgs& a) {
    const int rep = a.H / a.Hkv;
    pool.parallel_for(a.B * a.H, [&](int task, int) {
        thread_local std::vector<float> sc;
        const int b = task / a.H, h = task % a.H, hk = h / rep;
        const float* q = a.q + b * a.qb + h * a.qh;
        const float* k = a.k + b * a.kb + hk * a.kh;
        const float* v = a.v + b * a.vb + hk * a.vh;
        const float* m = a.mask ? a.mask + b * a.mb + h * a.mh : nullptr;
        float* out = a.out + ((size_t)b * a.H + h) * a.dv;
        sc.resize((size_t)a.S);
        float mx = -std::numeric_limits<float>::infinity();
#if HM_ATT_X86
        const bool avx2 = a.avx2;
#else
        const bool avx2 = false;
#endif
        for (int s = 0; s < a.S; ++s) {
#if HM_ATT_X86
            float x = (avx2 ? dot_avx2(q, k + s * a.ks, a.dk) : dot8(q, k + s * a.ks, a.dk)) * a.scale;
#else
            float x = dot8(q, k + s * a.ks, a.dk) * a.scale;
#endif
            if (m) x += m[s];
            sc[s] = x;
            mx = x > mx ? x : mx;
        }
        for (int i = 0; i < a.dv; ++i) out[i] = 0.0f;
        if (mx == -std::numeric_limits<float>::infinity()) return;  // everything masked
        float sum = 0.0f;
        for (int s = 0; s < a.S; ++s) {
            const float p = std::exp(sc[s] - mx);
            sc[s] = p;
            sum += p;
        }
#if HM_ATT_X86
        if (avx2)
            weighted_rows_avx2(sc.data(), v, a.vs, a.S, a.dv, out);
        else
#endif
            weighted_rows(sc.data(), v, a.vs, a.S, a.dv, out);
        (void)avx2;
        const float inv = 1.0f / sum;
        for (int i = 0; i < a.dv; ++i) out[i] *= inv;
    });
}

void rms_norm_rows(const float* x, const float* w, int R, int n, float eps, float* y) {
    for (int r = 0; r < R; ++r) {
        const float* xr = x + (size_t)r * n;
        float* yr = y + (size_t)r * n;
        const float ms = dot8(xr, xr, n) / (float)n;
        const float inv = 1.0f / std::sqrt(ms + eps);
        for (int i = 0; i < n; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
}

namespace {
inline void rotate_pairs(float* x, int rope, const float* f) {
    for (int i = 0; i < rope / 2; ++i) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1], c = f[2 * i], sn = f[2 * i + 1];
        x[2 * i] = x0 * c - x1 * sn;
        x[2 * i + 1] = x0 * sn + x1 * c;
    }
}
}  // namespace

void mla_rope_norm(float* q, int H, int dq, int rope, float* ckv, int lora, const float* w, float eps,
                   const float* freqs) {
    for (int h = 0; h < H; ++h) rotate_pairs(q + (size_t)h * dq + (dq - rope), rope, freqs);
    rms_norm_rows(ckv, w, 1, lora, eps, ckv);
    rotate_pairs(ckv + lora, rope, freqs);
}

}  // namespace cpu
}  // namespace hybrimoe
