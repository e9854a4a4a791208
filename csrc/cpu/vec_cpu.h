#pragma once
// Shared by the channels-last CPU op kernels (group_norm_silu_cpu.cpp, unet_ops_cpu.cpp, attention_cpu.cpp):
// a vectorisable exp and 16-wide float vectors (GCC vector extensions), inline in every translation unit.
// Each kernel file wraps its per-item work in functions compiled for x86-64-v4 / v3 / baseline (RF_CLONES;
// the OpenMP-outlined loop body itself is not cloned, so all arithmetic lives in the cloned item kernels).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/bf16_scalar.h"

#define RF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define RF_INLINE inline __attribute__((always_inline))

namespace rf {
namespace vec {

// exp(x) with range reduction x = n ln2 + r and a degree-6 polynomial on |r| <= ln2 / 2 (Cephes expf
// coefficients); relative error ~2 ulp, vectorisable (no libm call).
RF_INLINE float fexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return e * s;
}

// ---- 16-wide vectors (GCC vector extensions: zmm on x86-64-v4, split into ymm/xmm on the other clones) --

typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

RF_INLINE v16 vld(const float* p) {
  v16 v;
  std::memcpy(&v, p, 64);
  return v;
}
RF_INLINE v16 vld(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, 32);
  const u32x16 u = __builtin_convertvector(h, u32x16) << 16;
  v16 v;
  std::memcpy(&v, &u, 64);
  return v;
}
RF_INLINE void vst(float* p, v16 v) { std::memcpy(p, &v, 64); }
RF_INLINE void vst(uint16_t* p, v16 v) {
  u32x16 u;
  std::memcpy(&u, &v, 64);
  const u32x16 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const u32x16 qnan = r * 0u + 0x7FC0u;
  const u32x16 y = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? qnan : r;
  const u16x16 h = __builtin_convertvector(y, u16x16);
  std::memcpy(p, &h, 32);
}
RF_INLINE v16 vsplat(float a) { return v16{} + a; }
RF_INLINE v16 vmax(v16 a, v16 b) { return a > b ? a : b; }
// Horizontal reductions as a shuffle tree (4 steps instead of 15 lane extracts).
RF_INLINE v16 swap_halves(v16 a, int step) {
  static constexpr u32x16 kIdx[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                                     {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                                     {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                                     {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
  return __builtin_shuffle(a, kIdx[step]);
}
RF_INLINE float hsum(v16 a) {
  for (int step = 0; step < 4; ++step) a += swap_halves(a, step);
  return a[0];
}
RF_INLINE float hmax(v16 a) {
  for (int step = 0; step < 4; ++step) a = vmax(a, swap_halves(a, step));
  return a[0];
}

// fexp on 16 lanes; rounds x log2(e) to nearest with the 1.5 * 2^23 trick (|x log2 e| < 2^22 after clamping)
RF_INLINE v16 vexp(v16 x) {
  x = vmax(x, vsplat(-87.3f));
  x = x < 88.3f ? x : vsplat(88.3f);
  const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 e = p * r * r + r + 1.0f;
  const u32x16 bits = (u32x16)((__builtin_convertvector(n, i32x16) + 127) << 23);
  v16 s;
  std::memcpy(&s, &bits, 64);
  return e * s;
}

}  // namespace vec
}  // namespace rf
