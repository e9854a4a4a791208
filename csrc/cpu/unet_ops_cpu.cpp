// Fused channels-last ops for the CPU U-Net (see unet_ops_cpu.h for the contract of each op).
//
// Structure: an OpenMP loop over independent items (a batch image, or an image x head) calls a per-item
// kernel compiled for x86-64-v4 / v3 / baseline (target_clones; the OpenMP-outlined loop body itself is
// not cloned, so all arithmetic lives in the cloned item kernels). Inner loops run over the contiguous
// channel axis and vectorise.
#include "cpu/unet_ops_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/attn_bf16_cpu.h"
#include "cpu/bf16_scalar.h"
#include "cpu/conv_cpu.h"

#define RF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define RF_INLINE inline __attribute__((always_inline))

namespace rf {
namespace {

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

// ---- GroupNorm + scale/shift + SiLU (+ residual), one image ------------------------------------------

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
  for (int64_t g = 0; g < groups; ++g) {
    float s = 0.0f;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += a[c];
    const float rstd = 1.0f / std::sqrt(s / count + eps);
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const float sc = scale ? 1.0f + scale[c] : 1.0f;
      const float w = rstd * weight[c];
      a[c] = w * sc;
      k[c] = (bias[c] - csum[c] * w) * sc + (shift ? shift[c] : 0.0f);
    }
  }
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
  for (int64_t g = 0; g < groups; ++g) {
    float sum = 0.0f;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sum += a[c];
    const float rstd = 1.0f / std::sqrt(sum / count + eps);
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const float sc = scale ? 1.0f + scale[c] : 1.0f;
      const float w = rstd * weight[c];
      a[c] = w * sc;
      k[c] = (bias[c] - mean[c] * w) * sc + (shift ? shift[c] : 0.0f);
    }
  }
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

// ---- attention, one (image, head) --------------------------------------------------------------------
// buf holds 3 * pixels * dim + dim * dim + 4 * dim floats (linear) or pixels * (2 * dim + 1) (softmax).

// acc[e] = sum_i softmax(logits)_i rows[i * dim + e] for i < n (logits is overwritten with exp(logits - max)).
RF_INLINE void softmax_mix(float* logits, int64_t n, const float* rows, int64_t dim, float* acc) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, logits[i]);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    logits[i] = fexp(logits[i] - m);
    s += logits[i];
  }
  const float inv = 1.0f / s;
  for (int64_t e = 0; e < dim; ++e) acc[e] = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float w = logits[i] * inv;
    const float* r = rows + i * dim;
#pragma omp simd
    for (int64_t e = 0; e < dim; ++e) acc[e] += w * r[e];
  }
}

template <typename T>
RF_INLINE void lin_item_impl(const T* qkv, int64_t pixels, int64_t heads, int64_t dim, int64_t h, T* out,
                             float* buf) {
  const int64_t hidden = heads * dim, stride = 3 * hidden;
  float* kx = buf;                         // (P, d) exp(k - max_P k)
  float* vv = kx + pixels * dim;           // (P, d) v as float
  float* ctx = vv + pixels * dim;          // (d, d) softmax_P(k)^T v
  float* kmax = ctx + dim * dim;           // (d,)
  float* ksum = kmax + dim;                // (d,)
  const T* qb = qkv + h * dim;
  const T* kb = qkv + hidden + h * dim;
  const T* vb = qkv + 2 * hidden + h * dim;
  for (int64_t j = 0; j < dim; ++j) kmax[j] = -INFINITY;
  for (int64_t p = 0; p < pixels; ++p) {
    const T* kr = kb + p * stride;
    const T* vr = vb + p * stride;
    float* vo = vv + p * dim;
    float* ko = kx + p * dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) {
      const float kv = ld(kr[j]);
      ko[j] = kv;
      kmax[j] = std::max(kmax[j], kv);
      vo[j] = ld(vr[j]);
    }
  }
  for (int64_t j = 0; j < dim; ++j) ksum[j] = 0.0f;
  for (int64_t p = 0; p < pixels; ++p) {
    float* ko = kx + p * dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) {
      const float e = fexp(ko[j] - kmax[j]);
      ko[j] = e;
      ksum[j] += e;
    }
  }
  for (int64_t i = 0; i < dim * dim; ++i) ctx[i] = 0.0f;
  for (int64_t p = 0; p < pixels; ++p) {
    const float* kr = kx + p * dim;
    const float* vr = vv + p * dim;
    for (int64_t j = 0; j < dim; ++j) {
      const float kj = kr[j];
      float* cr = ctx + j * dim;
#pragma omp simd
      for (int64_t e = 0; e < dim; ++e) cr[e] += kj * vr[e];
    }
  }
  const float qscale = 1.0f / std::sqrt(static_cast<float>(dim));
  for (int64_t j = 0; j < dim; ++j) {  // fold 1 / sum_P and the q scale into the context rows
    const float f = qscale / ksum[j];
    float* cr = ctx + j * dim;
#pragma omp simd
    for (int64_t e = 0; e < dim; ++e) cr[e] *= f;
  }
  float* q = ksum + dim;   // (d,) scratch
  float* acc = q + dim;    // (d,)
  for (int64_t p = 0; p < pixels; ++p) {
    const T* qr = qb + p * stride;
    for (int64_t j = 0; j < dim; ++j) q[j] = ld(qr[j]);
    softmax_mix(q, dim, ctx, dim, acc);
    T* o = out + p * hidden + h * dim;
#pragma omp simd
    for (int64_t e = 0; e < dim; ++e) st(o + e, acc[e]);
  }
}

// lin_item_impl for d = 16 NV, register-blocked: the context rows (JB of them) and the output pixels (PB of
// them) accumulate in vector registers. buf: 3 P d + d d + 2 d floats.
template <int NV, typename T>
RF_INLINE void lin_item_vec(const T* qkv, int64_t pixels, int64_t heads, int64_t h, T* out, float* buf) {
  constexpr int64_t D = 16 * NV;
  constexpr int JB = 16 / NV;
  const int64_t hidden = heads * D, stride = 3 * hidden;
  float* kx = buf;
  float* vv = kx + pixels * D;
  float* qx = vv + pixels * D;
  float* ctx = qx + pixels * D;
  float* ksum = ctx + D * D;
  const T* qb = qkv + h * D;
  const T* kb = qkv + hidden + h * D;
  const T* vb = qkv + 2 * hidden + h * D;
  v16 km[NV], ks[NV];
  for (int n = 0; n < NV; ++n) {
    km[n] = vsplat(-INFINITY);
    ks[n] = vsplat(0.0f);
  }
  for (int64_t p = 0; p < pixels; ++p)
    for (int n = 0; n < NV; ++n) {
      const v16 kv = vld(kb + p * stride + 16 * n);
      vst(kx + p * D + 16 * n, kv);
      vst(vv + p * D + 16 * n, vld(vb + p * stride + 16 * n));
      km[n] = vmax(km[n], kv);
    }
  for (int64_t p = 0; p < pixels; ++p)
    for (int n = 0; n < NV; ++n) {
      const v16 e = vexp(vld(kx + p * D + 16 * n) - km[n]);
      vst(kx + p * D + 16 * n, e);
      ks[n] += e;
    }
  const float qscale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int n = 0; n < NV; ++n) vst(ksum + 16 * n, qscale / ks[n]);
  for (int64_t j0 = 0; j0 < D; j0 += JB) {  // ctx[j, :] = sum_p kx[p, j] v[p, :]
    v16 acc[JB][NV];
    for (int jj = 0; jj < JB; ++jj)
      for (int n = 0; n < NV; ++n) acc[jj][n] = vsplat(0.0f);
    for (int64_t p = 0; p < pixels; ++p) {
      v16 v[NV];
      for (int n = 0; n < NV; ++n) v[n] = vld(vv + p * D + 16 * n);
#pragma GCC unroll 16
      for (int jj = 0; jj < JB; ++jj) {
        const float kj = kx[p * D + j0 + jj];
        for (int n = 0; n < NV; ++n) acc[jj][n] += kj * v[n];
      }
    }
    for (int jj = 0; jj < JB; ++jj)
      for (int n = 0; n < NV; ++n) vst(ctx + (j0 + jj) * D + 16 * n, acc[jj][n] * ksum[j0 + jj]);
  }
  for (int64_t p = 0; p < pixels; ++p) {  // q' = softmax_d(q)
    v16 q[NV];
    v16 m = vsplat(-INFINITY);
    for (int n = 0; n < NV; ++n) {
      q[n] = vld(qb + p * stride + 16 * n);
      m = vmax(m, q[n]);
    }
    const float mx = hmax(m);
    v16 s = vsplat(0.0f);
    for (int n = 0; n < NV; ++n) {
      q[n] = vexp(q[n] - mx);
      s += q[n];
    }
    const float inv = 1.0f / hsum(s);
    for (int n = 0; n < NV; ++n) vst(qx + p * D + 16 * n, q[n] * inv);
  }
  constexpr int PB = 16 / NV;
  for (int64_t p0 = 0; p0 < pixels; p0 += PB) {  // out[p, :] = sum_j q'[p, j] ctx[j, :]
    const int64_t pb = std::min<int64_t>(PB, pixels - p0);
    v16 acc[PB][NV];
    for (int pp = 0; pp < PB; ++pp)
      for (int n = 0; n < NV; ++n) acc[pp][n] = vsplat(0.0f);
    if (pb == PB) {
      for (int64_t j = 0; j < D; ++j) {
        v16 c[NV];
        for (int n = 0; n < NV; ++n) c[n] = vld(ctx + j * D + 16 * n);
#pragma GCC unroll 16
        for (int pp = 0; pp < PB; ++pp) {
          const float qj = qx[(p0 + pp) * D + j];
          for (int n = 0; n < NV; ++n) acc[pp][n] += qj * c[n];
        }
      }
    } else {
      for (int64_t j = 0; j < D; ++j)
        for (int64_t pp = 0; pp < pb; ++pp)
          for (int n = 0; n < NV; ++n) acc[pp][n] += qx[(p0 + pp) * D + j] * vld(ctx + j * D + 16 * n);
    }
    for (int64_t pp = 0; pp < pb; ++pp)
      for (int n = 0; n < NV; ++n) vst(out + (p0 + pp) * hidden + h * D + 16 * n, acc[pp][n]);
  }
}

template <typename T>
RF_INLINE void sm_item_impl(const T* qkv, int64_t pixels, int64_t heads, int64_t dim, int64_t h, T* out,
                            float* buf) {
  const int64_t hidden = heads * dim, stride = 3 * hidden;
  float* kk = buf;                   // (P, d)
  float* vv = kk + pixels * dim;     // (P, d)
  float* sc = vv + pixels * dim;     // (P,) scores of one query
  float* acc = sc + pixels;          // (d,)
  for (int64_t p = 0; p < pixels; ++p) {
    const T* kr = qkv + p * stride + hidden + h * dim;
    const T* vr = qkv + p * stride + 2 * hidden + h * dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) {
      kk[p * dim + j] = ld(kr[j]);
      vv[p * dim + j] = ld(vr[j]);
    }
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  for (int64_t p = 0; p < pixels; ++p) {
    const T* qr = qkv + p * stride + h * dim;
    for (int64_t p2 = 0; p2 < pixels; ++p2) {
      const float* kr = kk + p2 * dim;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < dim; ++j) s += ld(qr[j]) * scale * kr[j];
      sc[p2] = s;
    }
    softmax_mix(sc, pixels, vv, dim, acc);
    T* o = out + p * hidden + h * dim;
#pragma omp simd
    for (int64_t e = 0; e < dim; ++e) st(o + e, acc[e]);
  }
}

// sm_item_impl for d = 16 NV (same buffer layout).
template <int NV, typename T>
RF_INLINE void sm_item_vec(const T* qkv, int64_t pixels, int64_t heads, int64_t h, T* out, float* buf) {
  constexpr int64_t D = 16 * NV;
  const int64_t hidden = heads * D, stride = 3 * hidden;
  float* kk = buf;
  float* vv = kk + pixels * D;
  float* sc = vv + pixels * D;
  for (int64_t p = 0; p < pixels; ++p)
    for (int n = 0; n < NV; ++n) {
      vst(kk + p * D + 16 * n, vld(qkv + p * stride + hidden + h * D + 16 * n));
      vst(vv + p * D + 16 * n, vld(qkv + p * stride + 2 * hidden + h * D + 16 * n));
    }
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t p = 0; p < pixels; ++p) {
    v16 q[NV];
    for (int n = 0; n < NV; ++n) q[n] = vld(qkv + p * stride + h * D + 16 * n) * scale;
    float m = -INFINITY;
    for (int64_t p2 = 0; p2 < pixels; ++p2) {
      v16 d = q[0] * vld(kk + p2 * D);
      for (int n = 1; n < NV; ++n) d += q[n] * vld(kk + p2 * D + 16 * n);
      sc[p2] = hsum(d);
      m = std::max(m, sc[p2]);
    }
    float tot = 0.0f;
    for (int64_t p2 = 0; p2 < pixels; ++p2) {
      sc[p2] = fexp(sc[p2] - m);
      tot += sc[p2];
    }
    const float inv = 1.0f / tot;
    v16 acc[NV];
    for (int n = 0; n < NV; ++n) acc[n] = vsplat(0.0f);
    for (int64_t p2 = 0; p2 < pixels; ++p2) {
      const float w = sc[p2] * inv;
      for (int n = 0; n < NV; ++n) acc[n] += w * vld(vv + p2 * D + 16 * n);
    }
    for (int n = 0; n < NV; ++n) vst(out + p * hidden + h * D + 16 * n, acc[n]);
  }
}

// One (image, head) of either attention, on the vector path when the head dim is 16, 32 or 64.
template <typename T>
RF_INLINE void attn_item_any(bool linear, const T* qkv, int64_t p, int64_t hs, int64_t d, int64_t h, T* o, float* buf) {
  switch (d) {
    case 16: return linear ? lin_item_vec<1>(qkv, p, hs, h, o, buf) : sm_item_vec<1>(qkv, p, hs, h, o, buf);
    case 32: return linear ? lin_item_vec<2>(qkv, p, hs, h, o, buf) : sm_item_vec<2>(qkv, p, hs, h, o, buf);
    case 64: return linear ? lin_item_vec<4>(qkv, p, hs, h, o, buf) : sm_item_vec<4>(qkv, p, hs, h, o, buf);
    default: return linear ? lin_item_impl(qkv, p, hs, d, h, o, buf) : sm_item_impl(qkv, p, hs, d, h, o, buf);
  }
}

RF_CLONES void attn_item(bool linear, const float* qkv, int64_t p, int64_t hs, int64_t d, int64_t h, float* o,
                         float* buf) {
  attn_item_any(linear, qkv, p, hs, d, h, o, buf);
}
RF_CLONES void attn_item(bool linear, const uint16_t* qkv, int64_t p, int64_t hs, int64_t d, int64_t h, uint16_t* o,
                         float* buf) {
  attn_item_any(linear, qkv, p, hs, d, h, o, buf);
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

void concat_rows(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t rows, int64_t bytes_a, int64_t bytes_b) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out + r * (bytes_a + bytes_b), a + r * bytes_a, bytes_a);
    std::memcpy(out + r * (bytes_a + bytes_b) + bytes_a, b + r * bytes_b, bytes_b);
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

template <typename T>
void attention_cl(bool linear, const T* qkv, int64_t batch, int64_t pixels, int64_t heads, int64_t dim, T* out) {
  const int64_t items = batch * heads;
  if constexpr (std::is_same_v<T, uint16_t>) {
    static const bool bf16_dot = conv_bf16_supported();
    if (linear && bf16_dot && dim == 32) {  // bf16 contractions with vdpbf16ps (attn_bf16_cpu.cpp)
#pragma omp parallel
      {
        std::vector<uint8_t> scratch(static_cast<size_t>(lin_attn_bf16_scratch_bytes(pixels)));
        void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; ++i) {
          const int64_t b = i / heads, h = i % heads;
          lin_attn_bf16_item(qkv + b * pixels * 3 * heads * dim, pixels, heads, h, out + b * pixels * heads * dim,
                             aligned);
        }
      }
      return;
    }
  }
  // scratch: linear 3 P d + d d + 4 d floats, softmax 2 P d + P + d
  const int64_t floats = linear ? 3 * pixels * dim + dim * dim + 4 * dim : 2 * pixels * dim + pixels + dim;
#pragma omp parallel
  {
    std::vector<float> buf(static_cast<size_t>(floats));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t b = i / heads, h = i % heads;
      attn_item(linear, qkv + b * pixels * 3 * heads * dim, pixels, heads, dim, h, out + b * pixels * heads * dim,
                buf.data());
    }
  }
}

template <typename T>
void linear_attn_cl(const T* qkv, int64_t batch, int64_t pixels, int64_t heads, int64_t dim, T* out) {
  attention_cl(true, qkv, batch, pixels, heads, dim, out);
}

template <typename T>
void softmax_attn_cl(const T* qkv, int64_t batch, int64_t pixels, int64_t heads, int64_t dim, T* out) {
  attention_cl(false, qkv, batch, pixels, heads, dim, out);
}

#define RF_INSTANTIATE(T)                                                                                    \
  template void gn_silu_cl<T>(const T*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,    \
                              const float*, const float*, int64_t, const T*, bool, float, T*);              \
  template void channel_norm_cl<T>(const T*, int64_t, int64_t, float, T*);                                  \
  template void linear_attn_cl<T>(const T*, int64_t, int64_t, int64_t, int64_t, T*);                        \
  template void softmax_attn_cl<T>(const T*, int64_t, int64_t, int64_t, int64_t, T*);
RF_INSTANTIATE(float)
RF_INSTANTIATE(uint16_t)
#undef RF_INSTANTIATE

}  // namespace rf
