// CPU Philox normals: OpenMP over rows/chunks, SIMD inside a chunk.
//
// The scalar libm calls (logf, cosf) block vectorisation, so the Box-Muller step uses branch-free float
// approximations written for the ranges that occur here (u in [1e-7, 1], angle in [0, 2*pi)); both are
// within ~2 ulp of libm, far inside the contract's ~1e-6 agreement. The integer stream is exact.
// The chunk kernel is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline x86-64 and chosen at load time
// (GCC target_clones), so one portable build runs at full width on the host.
#include "cpu/philox_cpu.h"

#include <omp.h>

#include <algorithm>

namespace rf {
namespace {

// log(x) for x in [1e-7, 1]: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| < 0.172; odd series to s^11 (truncation < 1e-9).
inline float log_approx(float x) {
  // shift the exponent boundary to sqrt(1/2) with integer arithmetic (no selects in the SIMD loop)
  const uint32_t ix = __builtin_bit_cast(uint32_t, x) + (0x3f800000u - 0x3f3504f3u);
  const float ef = static_cast<float>(static_cast<int32_t>(ix >> 23) - 127);
  const float m = __builtin_bit_cast(float, (ix & 0x007fffffu) + 0x3f3504f3u);  // [sqrt(1/2), sqrt(2))
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return ef * 0.693145751953125f + (ef * 1.428606820309417e-06f + 2.0f * s * p);
}

// cos(t) for t in [0, 2*pi + small]: quadrant k = round(t * 2/pi), y = t - k*pi/2 (three-part
// Cody-Waite), then the Taylor polynomials of sin/cos on [-pi/4, pi/4] (truncation < 2e-9).
inline float cos_approx(float t) {
  const float kf = static_cast<float>(static_cast<int32_t>(t * 0.636619772f + 0.5f));
  float y = t - kf * 1.5703125f;
  y = y - kf * 4.837512969970703125e-4f;
  y = y - kf * 7.549789948768648e-8f;
  const float y2 = y * y;
  float c = -1.0f / 3628800.0f;
  c = c * y2 + 1.0f / 40320.0f;
  c = c * y2 - 1.0f / 720.0f;
  c = c * y2 + 1.0f / 24.0f;
  c = c * y2 - 0.5f;
  c = c * y2 + 1.0f;
  float s = 1.0f / 362880.0f;
  s = s * y2 - 1.0f / 5040.0f;
  s = s * y2 + 1.0f / 120.0f;
  s = s * y2 - 1.0f / 6.0f;
  s = (s * y2) * y + y;
  const int32_t q = static_cast<int32_t>(kf) & 3;  // q=0: cos, 1: -sin, 2: -cos, 3: sin
  const float odd = static_cast<float>(q & 1);
  const float sign = 1.0f - 2.0f * static_cast<float>(((q + 1) >> 1) & 1);
  return sign * (c + odd * (s - c));
}

}  // namespace

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void randn_chunk(uint32_t k0, uint32_t k1, uint64_t first, int64_t n, float* __restrict out) {
  // 32-bit lanes only: the counter's high word is first_hi + carry, so the loop runs 16 wide on AVX-512
  const uint32_t lo0 = static_cast<uint32_t>(first), hi0 = static_cast<uint32_t>(first >> 32);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t lo = lo0 + static_cast<uint32_t>(j);
    const uint32_t hi = hi0 + static_cast<uint32_t>(lo < lo0);
    const U32x4 r = philox4x32_10(lo, hi, 0u, 0u, k0, k1);
    const float u0 = std::max(uint_to_uniform(r.v[0]), kMinUniform);
    const float u1 = uint_to_uniform(r.v[1]);
    const float rad = __builtin_sqrtf(-2.0f * log_approx(u0));
    out[j] = rad * cos_approx(kTwoPi * u1);
  }
}

void philox_randn_cpu(const uint64_t* keys, int64_t rows, int64_t n, uint64_t offset, float* out) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks_per_row = (n + kChunk - 1) / kChunk;
  const int64_t total = rows * chunks_per_row;
#pragma omp parallel for schedule(static) if (total > 1)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t r = t / chunks_per_row;
    const int64_t start = (t % chunks_per_row) * kChunk;
    const int64_t len = std::min(kChunk, n - start);
    const uint64_t key = keys[r];
    randn_chunk(static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), offset + start, len,
                out + r * n + start);
  }
}

void philox_randint4x_cpu(const uint32_t* counters, const uint32_t* keys, int64_t n, uint32_t* out) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t* c = counters + 4 * i;
    const U32x4 r = philox4x32_10(c[0], c[1], c[2], c[3], keys[2 * i], keys[2 * i + 1]);
    for (int w = 0; w < 4; ++w) out[4 * i + w] = r.v[w];
  }
}

void derive_keys_cpu(uint64_t seed, const int64_t* images, int64_t n, uint32_t step, uint32_t stream,
                     uint64_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = derive_key(seed, static_cast<uint32_t>(images[i]), step, stream);
}

}  // namespace rf
