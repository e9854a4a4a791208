#pragma once
#include <cstdint>

namespace rf {
// One generic sampler update (retina_fast/samplers.py) over a batch of B images with n elements each:
//   x0  = (x - s1 * eps) * inv_a1, clamped to [-1, 1] if clip
//   out = cx * x + c0 * x0 [+ cp * x0_prev] [+ std * normal(keys[b], j)]
// x0_prev may be null (cp ignored); keys may be null (std ignored). Noise is generated in the loop.
struct StepCoefC {
  float inv_a1, s1, cx, c0, cp, stdv;
};
void sampler_step_cpu(const float* x, const float* eps, const float* x0_prev, const uint64_t* keys, int64_t batch,
                      int64_t n, StepCoefC c, bool clip, float* out, float* x0_out);
}  // namespace rf
