// Channel LayerNorm, channel concat and elementwise add, channels-last (see unet_ops_cpu.h for the contract).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/unet_ops_cpu.h"
#include "cpu/vec_cpu.h"

namespace rf {
namespace {

using namespace vec;

// ---- channel LayerNorm, a block of rows --------------------------------------------------------------

template <typename T>
RF_INLINE void cn_rows_impl(const T* x, int64_t rows, int64_t channels, float eps, T* out) {
  const float inv = 1.0f / static_cast<float>(channels);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * channels;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < channels; ++c) s += ld(xr[c]);
    const float mean = s * inv;
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < channels; ++c) {
      const float d = ld(xr[c]) - mean;
      v += d * d;
    }
    const float rstd = 1.0f / std::sqrt(v * inv + eps);
    T* o = out + r * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) st(o + c, (ld(xr[c]) - mean) * rstd);
  }
}

RF_CLONES void cn_rows(const float* x, int64_t rows, int64_t c, float eps, float* o) { cn_rows_impl(x, rows, c, eps, o); }
RF_CLONES void cn_rows(const uint16_t* x, int64_t rows, int64_t c, float eps, uint16_t* o) {
  cn_rows_impl(x, rows, c, eps, o);
}

}  // namespace

void concat_rows(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t rows, int64_t bytes_a, int64_t bytes_b) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out + r * (bytes_a + bytes_b), a + r * bytes_a, bytes_a);
    std::memcpy(out + r * (bytes_a + bytes_b) + bytes_a, b + r * bytes_b, bytes_b);
  }
}

template <typename T>
void add_cl(const T* a, const T* b, int64_t n, T* out) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t lo = i * kChunk, hi = std::min(n, lo + kChunk);
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) st(out + j, ld(a[j]) + ld(b[j]));
  }
}

template <typename T>
void channel_norm_cl(const T* x, int64_t rows, int64_t channels, float eps, T* out) {
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t r0 = i * kBlock;
    cn_rows(x + r0 * channels, std::min(kBlock, rows - r0), channels, eps, out + r0 * channels);
  }
}

template void add_cl<float>(const float*, const float*, int64_t, float*);
template void add_cl<uint16_t>(const uint16_t*, const uint16_t*, int64_t, uint16_t*);
template void channel_norm_cl<float>(const float*, int64_t, int64_t, float, float*);
template void channel_norm_cl<uint16_t>(const uint16_t*, int64_t, int64_t, float, uint16_t*);

}  // namespace rf
