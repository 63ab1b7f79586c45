// Q4_K GEMV in plain CUDA C++: y[n] = sum_k W[n, k] * x[k], W as raw GGUF Q4_K blocks.
// A second opinion for the Triton kernels in microbench/triton_moe.py, not a runtime path.
//
// Block layout and the 6-bit scale/min unpacking come from kernels/cpu/blocks.h (compile with
// -I kernels/cpu); nothing of it is re-typed here.
//
// One warp per row; the 32 lanes split each 256-weight super-block: lane l takes sub-block
// j = l / 4 (scale/min j) and its 8 weights (l % 4) * 8 .. +7, read as one 8-byte load of 8 quant
// bytes (the qs bytes of a super-block start 16-byte aligned: 144-byte blocks, 16-byte header).
// Lanes of a warp read 256 contiguous quant bytes per step; fp32 accumulation, shuffle reduction.
//
// Build (what hybrimoe.gpu.cuda_q4k_gemv does at first use):
//   nvcc -O3 -arch=sm_90 -shared -Xcompiler -fPIC -I kernels/cpu kernels/cuda/q4k_gemv.cu -o libhm_q4k_gemv.so
#include <cuda_runtime.h>
#include <cstdint>
#include <cstring>

#include "blocks.h"

namespace {

using hybrimoe::block_q4_K;
using hybrimoe::get_scale_min_k4;
using hybrimoe::half_to_float;
using hybrimoe::QK_K;

constexpr int kWarpsPerBlock = 4;

__global__ void __launch_bounds__(32 * kWarpsPerBlock)
q4k_gemv_kernel(const block_q4_K* __restrict__ w, const float* __restrict__ x,
                float* __restrict__ y, int n_rows, int n_cols) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    const int nb = n_cols / QK_K;
    const block_q4_K* blocks = w + (size_t)row * nb;

    const int j = lane >> 2;                     // sub-block of 32 weights: its scale and min
    const int e0 = (lane & 3) * 8;               // first of this lane's 8 weights in the sub-block
    const int byte0 = 32 * (j >> 1) + e0;        // their quant bytes: chunk j/2, low or high nibble
    const int shift = 4 * (j & 1);

    float acc = 0.f;
    for (int b = 0; b < nb; ++b) {
        const block_q4_K& blk = blocks[b];
        uint8_t sc, m;
        get_scale_min_k4(j, blk.scales, &sc, &m);
        const float d = half_to_float(blk.d) * sc;
        const float dm = half_to_float(blk.dmin) * m;
        const uint2 q8 = *reinterpret_cast<const uint2*>(blk.qs + byte0);
        const float4* xv = reinterpret_cast<const float4*>(x + (size_t)b * QK_K + 32 * j + e0);
        const float4 xa = xv[0], xb = xv[1];
        const float xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        float qdot = 0.f, xsum = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const uint32_t word = i < 4 ? q8.x : q8.y;
            const float q = (float)((word >> (8 * (i & 3) + shift)) & 0xF);
            qdot = fmaf(q, xs[i], qdot);
            xsum += xs[i];
        }
        acc = fmaf(d, qdot, acc);               // w = d*sc*q - dmin*m, factored per sub-block
        acc = fmaf(-dm, xsum, acc);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) y[row] = acc;
}

}  // namespace

// C entry point (ctypes). w: n_rows * n_cols/256 Q4_K blocks (16-byte aligned); x: n_cols fp32
// (16-byte aligned); y: n_rows fp32. n_cols must be a multiple of 256. Returns a cudaError_t.
extern "C" int hm_q4k_gemv(const void* w, const float* x, float* y, int n_rows, int n_cols,
                           void* stream) {
    if (n_cols % QK_K != 0 || n_rows < 0) return (int)cudaErrorInvalidValue;
    if (n_rows == 0) return (int)cudaSuccess;
    const dim3 grid((n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    q4k_gemv_kernel<<<grid, 32 * kWarpsPerBlock, 0, (cudaStream_t)stream>>>(
        static_cast<const block_q4_K*>(w), x, y, n_rows, n_cols);
    return (int)cudaGetLastError();
}
