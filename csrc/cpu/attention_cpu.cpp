// Linear / softmax multi-head attention on a to_qkv output, one OpenMP item per (image, head) (see unet_ops_cpu.h for the contract).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/unet_ops_cpu.h"
#include "cpu/vec_cpu.h"

#include "cpu/attn_bf16_cpu.h"
#include "cpu/conv_cpu.h"

namespace rf {
namespace {

using namespace vec;

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

template void linear_attn_cl<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*);
template void linear_attn_cl<uint16_t>(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*);
template void softmax_attn_cl<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*);
template void softmax_attn_cl<uint16_t>(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*);

}  // namespace rf
