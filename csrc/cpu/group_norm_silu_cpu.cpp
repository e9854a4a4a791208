// GroupNorm + scale/shift + SiLU (+ residual), channels-last, one OpenMP item per image (see unet_ops_cpu.h for the contract).
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

// ---- GroupNorm + scale/shift + SiLU (+ residual), one image ------------------------------------------

// Per-channel y = x * a + k from the group statistics: on entry a[c] holds channel c's sum of squared
// deviations from its group mean mean[c]; GroupNorm's affine (weight, bias) and the optional FiLM scale / shift
// (y * (1 + scale) + shift) fold into a and k.
RF_INLINE void fold_groups(int64_t groups, int64_t cg, float count, float eps, const float* mean,
                           const float* weight, const float* bias, const float* scale, const float* shift, float* a,
                           float* k) {
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.0f;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += a[c];
    const float rstd = 1.0f / std::sqrt(s / count + eps);
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const float sc = scale ? 1.0f + scale[c] : 1.0f;
      const float w = rstd * weight[c];
      a[c] = w * sc;
      k[c] = (bias[c] - mean[c] * w) * sc + (shift ? shift[c] : 0.0f);
    }
  }
}

template <typename T>
RF_INLINE void gn_item_impl(const T* x, int64_t pixels, int64_t channels, int64_t groups, const float* weight,
                            const float* bias, const float* scale, const float* shift, const T* residual,
                            bool act, float eps, T* out, float* buf) {
  float* csum = buf;                // (C,) per-channel sums, then per-channel group mean
  float* a = buf + channels;        // (C,) y = x * a + k
  float* k = buf + 2 * channels;
  const int64_t cg = channels / groups;
  const float count = static_cast<float>(pixels * cg);
  for (int64_t c = 0; c < channels; ++c) csum[c] = 0.0f;
  for (int64_t p = 0; p < pixels; ++p) {
    const T* xr = x + p * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) csum[c] += ld(xr[c]);
  }
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.0f;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += csum[c];
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) csum[c] = s / count;  // now the group mean
  }
  for (int64_t c = 0; c < channels; ++c) a[c] = 0.0f;  // second pass: squared deviations
  for (int64_t p = 0; p < pixels; ++p) {
    const T* xr = x + p * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const float d = ld(xr[c]) - csum[c];
      a[c] += d * d;
    }
  }
  fold_groups(groups, cg, count, eps, csum, weight, bias, scale, shift, a, k);
  for (int64_t p = 0; p < pixels; ++p) {
    const T* xr = x + p * channels;
    const T* rr = residual ? residual + p * channels : nullptr;
    T* o = out + p * channels;
    if (act && rr) {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const float y = ld(xr[c]) * a[c] + k[c];
        st(o + c, y / (1.0f + fexp(-y)) + ld(rr[c]));
      }
    } else if (act) {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const float y = ld(xr[c]) * a[c] + k[c];
        st(o + c, y / (1.0f + fexp(-y)));
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const float y = ld(xr[c]) * a[c] + k[c];
        st(o + c, rr ? y + ld(rr[c]) : y);
      }
    }
  }
}

// Same as gn_item_impl for C = 16 NV: accumulators and per-channel factors stay in registers.
template <int NV, typename T>
RF_INLINE void gn_item_vec(const T* x, int64_t pixels, int64_t groups, const float* weight, const float* bias,
                           const float* scale, const float* shift, const T* residual, bool act, float eps, T* out,
                           float* buf) {
  constexpr int64_t C = 16 * NV;
  const int64_t cg = C / groups;
  const float count = static_cast<float>(pixels * cg);
  v16 acc[NV];
  for (int n = 0; n < NV; ++n) acc[n] = vsplat(0.0f);
  for (int64_t p = 0; p < pixels; ++p)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) acc[n] += vld(x + p * C + 16 * n);
  float* mean = buf;
  float* a = buf + C;
  float* k = buf + 2 * C;
  for (int n = 0; n < NV; ++n) vst(mean + 16 * n, acc[n]);
  for (int64_t g = 0; g < groups; ++g) {
    float sum = 0.0f;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sum += mean[c];
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) mean[c] = sum / count;
  }
  v16 mv[NV];
  for (int n = 0; n < NV; ++n) {
    mv[n] = vld(mean + 16 * n);
    acc[n] = vsplat(0.0f);
  }
  for (int64_t p = 0; p < pixels; ++p)
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) {
      const v16 d = vld(x + p * C + 16 * n) - mv[n];
      acc[n] += d * d;
    }
  for (int n = 0; n < NV; ++n) vst(a + 16 * n, acc[n]);
  fold_groups(groups, cg, count, eps, mean, weight, bias, scale, shift, a, k);
  v16 av[NV], kv[NV];
  for (int n = 0; n < NV; ++n) {
    av[n] = vld(a + 16 * n);
    kv[n] = vld(k + 16 * n);
  }
  for (int64_t p = 0; p < pixels; ++p) {
#pragma GCC unroll 8
    for (int n = 0; n < NV; ++n) {
      v16 y = vld(x + p * C + 16 * n) * av[n] + kv[n];
      if (act) y = y / (1.0f + vexp(-y));
      if (residual) y += vld(residual + p * C + 16 * n);
      vst(out + p * C + 16 * n, y);
    }
  }
}

template <typename T>
RF_INLINE void gn_item_any(const T* x, int64_t p, int64_t c, int64_t g, const float* w, const float* b,
                           const float* sc, const float* sh, const T* r, bool act, float eps, T* o, float* buf) {
  switch (c) {
    case 16: return gn_item_vec<1>(x, p, g, w, b, sc, sh, r, act, eps, o, buf);
    case 32: return gn_item_vec<2>(x, p, g, w, b, sc, sh, r, act, eps, o, buf);
    case 64: return gn_item_vec<4>(x, p, g, w, b, sc, sh, r, act, eps, o, buf);
    case 128: return gn_item_vec<8>(x, p, g, w, b, sc, sh, r, act, eps, o, buf);
    default: return gn_item_impl(x, p, c, g, w, b, sc, sh, r, act, eps, o, buf);
  }
}

RF_CLONES void gn_item(const float* x, int64_t p, int64_t c, int64_t g, const float* w, const float* b,
                       const float* sc, const float* sh, const float* r, bool act, float eps, float* o, float* buf) {
  gn_item_any(x, p, c, g, w, b, sc, sh, r, act, eps, o, buf);
}
RF_CLONES void gn_item(const uint16_t* x, int64_t p, int64_t c, int64_t g, const float* w, const float* b,
                       const float* sc, const float* sh, const uint16_t* r, bool act, float eps, uint16_t* o,
                       float* buf) {
  gn_item_any(x, p, c, g, w, b, sc, sh, r, act, eps, o, buf);
}

}  // namespace

template <typename T>
void gn_silu_cl(const T* x, int64_t batch, int64_t pixels, int64_t channels, int64_t groups, const float* weight,
                const float* bias, const float* scale, const float* shift, int64_t film_stride, const T* residual,
                bool act, float eps, T* out) {
  const int64_t n = pixels * channels;
#pragma omp parallel
  {
    std::vector<float> buf(3 * channels);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b)
      gn_item(x + b * n, pixels, channels, groups, weight, bias, scale ? scale + b * film_stride : nullptr,
              shift ? shift + b * film_stride : nullptr, residual ? residual + b * n : nullptr, act, eps,
              out + b * n, buf.data());
  }
}

template void gn_silu_cl<float>(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                                const float*, const float*, int64_t, const float*, bool, float, float*);
template void gn_silu_cl<uint16_t>(const uint16_t*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                                   const float*, const float*, int64_t, const uint16_t*, bool, float, uint16_t*);

}  // namespace rf
