// Linear attention, bf16 storage, head dim 32, with vdpbf16ps (AVX512-BF16).
//
// Same maths as lin_item_vec in unet_ops_cpu.cpp -- k' = softmax over tokens, context = k'^T v,
// out = softmax_d(q) d^-1/2 context -- with the two contractions done as bf16 dot products with fp32
// accumulation, the way PyTorch runs these matmuls at bf16: the exponentials of k, v, the context and
// softmax(q) are rounded to bf16 once before their contraction (max, sums and scaling stay fp32).
// Dot products pair adjacent elements of the reduction axis, so the operands are stored interleaved:
// kp/vp [token pair][column][2], cp [context-row pair][column][2].
#include "cpu/attn_bf16_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace rf {
namespace {

constexpr int64_t kD = 32;

#define RF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

RF_BF16_TARGET inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// exp(x) on 16 lanes (same range reduction and polynomial as fexp/vexp in unet_ops_cpu.cpp). Kept as
// intrinsics rather than sharing vexp's vector-extension form: with vexp this kernel ran 281-307 us vs
// 245 us (B = 8, 4 heads, 256 tokens, one thread, same build flags).
RF_BF16_TARGET inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(e, n);
}

// Interleave two rows of 32 values (fp32, as lo/hi halves) into [column][2] bf16 pairs: 64 bf16 -> dst.
RF_BF16_TARGET inline void store_pairs(uint16_t* dst, __m512 a_lo, __m512 a_hi, __m512 b_lo, __m512 b_hi) {
  const __m512i a = (__m512i)_mm512_cvtne2ps_pbh(a_hi, a_lo);  // a[0..31] as bf16
  const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(b_hi, b_lo);
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, _mm512_load_si512(lo_idx), b));
  _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, _mm512_load_si512(hi_idx), b));
}

RF_BF16_TARGET inline float hsum16(__m512 v) { return _mm512_reduce_add_ps(v); }

}  // namespace

int64_t lin_attn_bf16_scratch_bytes(int64_t pixels) {
  const int64_t pairs = (pixels + 1) / 2;
  return 2 * (2 * pairs * kD * 2 + pixels * kD + kD * kD) + 64;
}

RF_BF16_TARGET void lin_attn_bf16_item(const uint16_t* qkv, int64_t pixels, int64_t heads, int64_t h, uint16_t* out,
                                       void* scratch) {
  const int64_t hidden = heads * kD, stride = 3 * hidden, pairs = (pixels + 1) / 2;
  uint16_t* kp = static_cast<uint16_t*>(scratch);  // [pair][j][2]
  uint16_t* vp = kp + pairs * kD * 2;              // [pair][e][2]
  uint16_t* qb = vp + pairs * kD * 2;              // [p][j] softmax_d(q)
  uint16_t* cp = qb + pixels * kD;                 // [j pair][e][2] scaled context
  const uint16_t* qs = qkv + h * kD;
  const uint16_t* ks = qkv + hidden + h * kD;
  const uint16_t* vs = qkv + 2 * hidden + h * kD;
  // k: max over tokens, then exp and sums in fp32, stored as bf16 token pairs; v likewise (no maths)
  __m512 km0 = _mm512_set1_ps(-INFINITY), km1 = km0;
  for (int64_t p = 0; p < pixels; ++p) {
    km0 = _mm512_max_ps(km0, load_bf16(ks + p * stride));
    km1 = _mm512_max_ps(km1, load_bf16(ks + p * stride + 16));
  }
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    const int64_t p0 = 2 * q, p1 = std::min(p0 + 1, pixels - 1);
    const bool has1 = p0 + 1 < pixels;
    const __m512 a0 = exp16(_mm512_sub_ps(load_bf16(ks + p0 * stride), km0));
    const __m512 a1 = exp16(_mm512_sub_ps(load_bf16(ks + p0 * stride + 16), km1));
    const __m512 b0 = has1 ? exp16(_mm512_sub_ps(load_bf16(ks + p1 * stride), km0)) : zero;
    const __m512 b1 = has1 ? exp16(_mm512_sub_ps(load_bf16(ks + p1 * stride + 16), km1)) : zero;
    s0 = _mm512_add_ps(s0, _mm512_add_ps(a0, b0));
    s1 = _mm512_add_ps(s1, _mm512_add_ps(a1, b1));
    store_pairs(kp + q * kD * 2, a0, a1, b0, b1);
    store_pairs(vp + q * kD * 2, load_bf16(vs + p0 * stride), load_bf16(vs + p0 * stride + 16),
                has1 ? load_bf16(vs + p1 * stride) : zero, has1 ? load_bf16(vs + p1 * stride + 16) : zero);
  }
  // context rows j: sum over token pairs of kp[pair][j] . vp[pair][:]; 8 rows at a time in 16 accumulators
  const float qscale = 1.0f / std::sqrt(static_cast<float>(kD));
  alignas(64) float inv[kD];
  _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(qscale), s0));
  _mm512_store_ps(inv + 16, _mm512_div_ps(_mm512_set1_ps(qscale), s1));
  alignas(64) float ctx[kD][kD];
  for (int64_t j0 = 0; j0 < kD; j0 += 8) {
    __m512 acc[8][2];
    for (int jj = 0; jj < 8; ++jj) acc[jj][0] = acc[jj][1] = _mm512_setzero_ps();
    for (int64_t q = 0; q < pairs; ++q) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(vp + q * kD * 2);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(vp + q * kD * 2 + 32);
      const int32_t* kr = reinterpret_cast<const int32_t*>(kp + q * kD * 2);
#pragma GCC unroll 8
      for (int jj = 0; jj < 8; ++jj) {
        const __m512bh kv = (__m512bh)_mm512_set1_epi32(kr[j0 + jj]);
        acc[jj][0] = _mm512_dpbf16_ps(acc[jj][0], kv, w0);
        acc[jj][1] = _mm512_dpbf16_ps(acc[jj][1], kv, w1);
      }
    }
    for (int jj = 0; jj < 8; ++jj) {
      const __m512 f = _mm512_set1_ps(inv[j0 + jj]);
      _mm512_store_ps(ctx[j0 + jj], _mm512_mul_ps(acc[jj][0], f));
      _mm512_store_ps(ctx[j0 + jj] + 16, _mm512_mul_ps(acc[jj][1], f));
    }
  }
  for (int64_t j2 = 0; j2 < kD / 2; ++j2)
    store_pairs(cp + j2 * kD * 2, _mm512_load_ps(ctx[2 * j2]), _mm512_load_ps(ctx[2 * j2] + 16),
                _mm512_load_ps(ctx[2 * j2 + 1]), _mm512_load_ps(ctx[2 * j2 + 1] + 16));
  // q' = softmax over the head dim, per token, as bf16 rows
  for (int64_t p = 0; p < pixels; ++p) {
    const __m512 a = load_bf16(qs + p * stride), b = load_bf16(qs + p * stride + 16);
    const float m = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
    const __m512 ea = exp16(_mm512_sub_ps(a, _mm512_set1_ps(m)));
    const __m512 eb = exp16(_mm512_sub_ps(b, _mm512_set1_ps(m)));
    const __m512 r = _mm512_set1_ps(1.0f / hsum16(_mm512_add_ps(ea, eb)));
    _mm512_storeu_si512(qb + p * kD, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(eb, r), _mm512_mul_ps(ea, r)));
  }
  // out[p, :] = sum over j pairs of qb[p][j pair] . cp[j pair][:]; 12 tokens at a time
  constexpr int kPB = 12;
  for (int64_t p0 = 0; p0 < pixels; p0 += kPB) {
    const int64_t pb = std::min<int64_t>(kPB, pixels - p0);
    __m512 acc[kPB][2];
    for (int i = 0; i < kPB; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int32_t* qr[kPB];
    for (int i = 0; i < kPB; ++i) qr[i] = reinterpret_cast<const int32_t*>(qb + (p0 + std::min<int64_t>(i, pb - 1)) * kD);
    for (int64_t j2 = 0; j2 < kD / 2; ++j2) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(cp + j2 * kD * 2);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(cp + j2 * kD * 2 + 32);
#pragma GCC unroll 12
      for (int i = 0; i < kPB; ++i) {
        const __m512bh qv = (__m512bh)_mm512_set1_epi32(qr[i][j2]);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], qv, w0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], qv, w1);
      }
    }
    for (int64_t i = 0; i < pb; ++i)
      _mm512_storeu_si512(out + (p0 + i) * hidden + h * kD, (__m512i)_mm512_cvtne2ps_pbh(acc[i][1], acc[i][0]));
  }
}

}  // namespace rf
