// AVX-512 tier with VNNI (vpdpbusd / vpdpwssd): Ice Lake, Sapphire Rapids, Zen 4 and later.
// The kernels are in simd_avx512.h; this file only compiles them for this ISA.
#if defined(__x86_64__) || defined(_M_X64)

#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "blocks.h"
#include "cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace hybrimoe {
namespace cpu {
namespace {
using std::memcpy;
#define HM_AVX512 1
#define HM_VNNI 1
#include "simd_avx512.h"
}  // namespace

#pragma GCC pop_options

const TierOps& avx512_vnni_ops() {
    return avx512_table();
}

}  // namespace cpu
}  // namespace hybrimoe

#endif  // x86-64
