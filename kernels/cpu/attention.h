// Float32 helpers for the CPU decode step (kernels/cpu/attention.cpp): one-token attention over a
// strided key/value cache and RMSNorm rows. Portable loops (8 independent partial sums, which the
// compiler vectorises at the baseline ISA) plus AVX2 + FMA twins of the attention's inner loops,
// taken only when the caller says the CPU has them (AttendArgs::avx2).
#pragma once
#include <cstddef>
#include <cstdint>

namespace hybrimoe {
namespace cpu {

class ThreadPool;

// Strides in floats. Element (b, h, s, i) of K is k[b*kb + h*kh + s*ks + i] (i contiguous).
struct AttendArgs {
    const float* q;   // (B, H, dk): q[b*qb + h*qh + i]
    int64_t qb, qh;
    const float* k;   // (B, Hkv, S, dk)
    int64_t kb, kh, ks;
    const float* v;   // (B, Hkv, S, dv)
    int64_t vb, vh, vs;
    const float* mask;  // additive, (B, Hm, S) with Hm in {1, H}: mask[b*mb + h*mh + s]; may be null
    int64_t mb, mh;
    int B, H, Hkv, S, dk, dv;
    float scale;
    float* out;  // (B, H, dv), contiguous
    bool avx2;   // AVX2 + FMA inner loops (the caller checks the CPU and the active tier)
};

// out[b, h] = softmax_s(scale * q[b, h] . k[b, h / (H/Hkv), s] + mask[b, h, s]) @ v[b, h / (H/Hkv), s].
// A row whose every score is -inf gives zeros. One task per (b, h) on the pool.
void attend_one(ThreadPool& pool, const AttendArgs& a);

// y[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, for rows r in [0, R) of n floats (in float32, as
// transformers' RMSNorm modules compute a float32 input).
void rms_norm_rows(const float* x, const float* w, int R, int n, float eps, float* y);

// DeepSeek-V2 MLA, one token, in place (transformers' DeepseekV2Attention arithmetic in float32):
//   q (H, dq): the last `rope` floats of each head rotated;
//   ckv (lora + rope): the first `lora` floats RMS-normalised with w (eps), the last `rope` rotated.
// Rotation of pair i = (x[2i], x[2i+1]) by freqs (re_i, im_i) = cos/sin, as complex multiplication.
void mla_rope_norm(float* q, int H, int dq, int rope, float* ckv, int lora, const float* w, float eps,
                   const float* freqs);

}  // namespace cpu
}  // namespace hybrimoe
