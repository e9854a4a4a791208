// Fused sampler step on the CPU: one pass over x/eps (and x0_prev), noise drawn chunk by chunk into an
// L1-resident buffer. Bytes per element: 8-12 read, 8 written; the torch reference makes ~8 passes.
#include "cpu/sampler_step_cpu.h"

#include <algorithm>

#include "cpu/philox_cpu.h"

namespace rf {
namespace {

constexpr int64_t kChunk = 4096;

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void step_chunk(const float* __restrict x, const float* __restrict eps, const float* __restrict x0_prev,
                const float* __restrict z, int64_t n, StepCoefC c, bool clip, float* __restrict out,
                float* __restrict x0_out) {
  // written in the reference's operation order (no reassociation) so results match torch to rounding
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float x0 = (x[j] - c.s1 * eps[j]) * c.inv_a1;
    if (clip) x0 = std::min(std::max(x0, -1.0f), 1.0f);
    float o = c.cx * x[j] + c.c0 * x0;
    if (x0_prev) o = o + c.cp * x0_prev[j];
    if (z) o = o + c.stdv * z[j];
    out[j] = o;
    x0_out[j] = x0;
  }
}

}  // namespace

void sampler_step_cpu(const float* x, const float* eps, const float* x0_prev, const uint64_t* keys, int64_t batch,
                      int64_t n, StepCoefC c, bool clip, float* out, float* x0_out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t total = batch * chunks;
#pragma omp parallel if (total > 1)
  {
    alignas(64) float z[kChunk];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < total; ++t) {
      const int64_t b = t / chunks;
      const int64_t start = (t % chunks) * kChunk;
      const int64_t len = std::min(kChunk, n - start);
      const int64_t base = b * n + start;
      if (keys) randn_chunk(static_cast<uint32_t>(keys[b]), static_cast<uint32_t>(keys[b] >> 32),
                            static_cast<uint64_t>(start), len, z);
      step_chunk(x + base, eps + base, x0_prev ? x0_prev + base : nullptr, keys ? z : nullptr, len, c, clip,
                 out + base, x0_out + base);
    }
  }
}

}  // namespace rf
