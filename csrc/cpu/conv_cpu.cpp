// Direct convolutions, channels-last, bf16 (AVX512-BF16) or fp32 (AVX-512 FMA) storage (see conv_cpu.h).
//
// Implicit GEMM: rows are output pixels, columns output channels, the reduction runs over (tap, channel
// unit), a unit being a channel pair in bf16 (vdpbf16ps multiplies pairs) and one channel in fp32. A tile is
// kMR output pixels x 32 output channels held in 2 * kMR zmm accumulators; for each unit one 64-byte weight
// load per 16 columns feeds kMR multiply-adds (the pixel's unit is broadcast). Taps that fall outside the
// image read a zero row. Each output element is computed from its own pixel and taps only, in a fixed order,
// so results do not depend on batch size or tile position.
#include "cpu/conv_cpu.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace rf {
namespace {

constexpr int kMR = 12;  // output pixels per tile: 24 accumulators + 2 weight registers + 1 broadcast

#define RF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define RF_F32_TARGET __attribute__((target("avx512f,avx512vl")))

struct ConvShape {
  int64_t batch, h, w, c, kh, kw, n, np, stride, pad_h, pad_w, ho, wo;
  // output pixel (b, oh, ow) is stored at pixel (b, oh * out_step + out_h0, ow * out_step + out_w0) of an
  // (out_hfull, out_wfull) image: 1 / 0 / ho / wo for a plain convolution, 2 / parity / 2h / 2w for one
  // phase of a stride-2 transposed convolution
  int64_t out_step, out_h0, out_w0, out_hfull, out_wfull;
  // input memory: pixel (b, hi, wi) starts at ((b * h + hi) * wmem + wi) * pstride; a plain convolution has
  // wmem = w, pstride = c; the row form of a few-channel conv reads overlapping pixels (pstride < c)
  int64_t wmem, pstride;
  bool replicate;  // outside the image: the nearest edge pixel instead of zero
};

// One tile: kMR output pixels (rows m0 .. m0 + mr - 1) x 32 output channels from n0. src[t * kMR + i] points at
// pixel i's input row for tap t (or at a zero row outside the image).
// The epilogue of a tile's output columns n0 .. n0 + 31 (of n): lane masks of the two 16-column halves (m1 = 0
// when only the first half holds outputs) and the bias in those lanes (zero without a bias).
struct TileTail {
  __mmask16 m0, m1;
  __m512 b0, b1;
};

__attribute__((always_inline)) RF_F32_TARGET inline TileTail tile_tail(int64_t n, int64_t n0, const float* bias) {
  const int64_t valid = std::min<int64_t>(32, n - n0);
  TileTail t;
  t.m0 = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  t.m1 = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : static_cast<__mmask16>((1u << (valid - 16)) - 1);
  t.b0 = bias ? _mm512_maskz_loadu_ps(t.m0, bias + n0) : _mm512_setzero_ps();
  t.b1 = bias ? _mm512_maskz_loadu_ps(t.m1, bias + n0 + 16) : _mm512_setzero_ps();
  return t;
}

// kHalf: only the first 16 of the 32 columns hold outputs (a last block with N - n0 <= 16, e.g. a 16-band
// or 8-channel output conv): the other half is neither loaded nor multiplied.
template <bool kHalf>
RF_BF16_TARGET void tile_bf16(const ConvShape& s, const uint16_t* const* src, const int64_t* dst, const uint16_t* wp,
                              const float* bias, const uint16_t* res, uint16_t* out, int64_t mr, int64_t n0) {
  const int64_t c2n = s.c / 2;
  __m512 acc[kMR][2];
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < s.kh * s.kw; ++t) {
    const uint16_t* const* st = src + t * kMR;
    const uint16_t* wt = wp + (t * c2n * s.np + n0) * 2;
    for (int64_t c2 = 0; c2 < c2n; ++c2) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wt + c2 * s.np * 2);
      const __m512bh w1 = kHalf ? w0 : (__m512bh)_mm512_loadu_si512(wt + c2 * s.np * 2 + 32);
#pragma GCC unroll 12
      for (int i = 0; i < kMR; ++i) {
        int32_t pair;
        std::memcpy(&pair, st[i] + 2 * c2, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
        if (!kHalf) acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
      }
    }
  }
  const TileTail tail = tile_tail(s.n, n0, bias);
  const __mmask16 m0k = tail.m0, m1k = tail.m1;
  const __m512 b0 = tail.b0, b1 = tail.b1;
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t off = dst[i] * s.n + n0;
    __m512 v0 = _mm512_add_ps(acc[i][0], b0), v1 = _mm512_add_ps(acc[i][1], b1);
    if (res) {
      v0 = _mm512_add_ps(v0, _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m0k, res + off)), 16)));
      v1 = _mm512_add_ps(v1, _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m1k, res + off + 16)), 16)));
    }
    _mm256_mask_storeu_epi16(out + off, m0k, (__m256i)_mm512_cvtneps_pbh(v0));
    if (m1k) _mm256_mask_storeu_epi16(out + off + 16, m1k, (__m256i)_mm512_cvtneps_pbh(v1));
  }
}

// The fp32 tile: the same walk with one channel per step and fused multiply-adds.
template <bool kHalf>
RF_F32_TARGET void tile_f32(const ConvShape& s, const float* const* src, const int64_t* dst, const float* wp,
                            const float* bias, const float* res, float* out, int64_t mr, int64_t n0) {
  __m512 acc[kMR][2];
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < s.kh * s.kw; ++t) {
    const float* const* st = src + t * kMR;
    const float* wt = wp + t * s.c * s.np + n0;
    for (int64_t c = 0; c < s.c; ++c) {
      const __m512 w0 = _mm512_loadu_ps(wt + c * s.np);
      const __m512 w1 = kHalf ? w0 : _mm512_loadu_ps(wt + c * s.np + 16);
#pragma GCC unroll 12
      for (int i = 0; i < kMR; ++i) {
        const __m512 xv = _mm512_set1_ps(st[i][c]);
        acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
        if (!kHalf) acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      }
    }
  }
  const TileTail tail = tile_tail(s.n, n0, bias);
  const __mmask16 m0k = tail.m0, m1k = tail.m1;
  const __m512 b0 = tail.b0, b1 = tail.b1;
  for (int64_t i = 0; i < mr; ++i) {
    const int64_t off = dst[i] * s.n + n0;
    __m512 v0 = _mm512_add_ps(acc[i][0], b0), v1 = _mm512_add_ps(acc[i][1], b1);
    if (res) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0k, res + off));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1k, res + off + 16));
    }
    _mm512_mask_storeu_ps(out + off, m0k, v0);
    if (m1k) _mm512_mask_storeu_ps(out + off + 16, m1k, v1);
  }
}

// The input row of every (tap, pixel) of the tile starting at output row m0 (a partial tile repeats its
// last pixel; those rows are computed but not stored). Pixels are walked incrementally (one division per
// tile); a pixel whose taps all fall inside the image takes the precomputed tap offsets unchecked.
template <typename T>
void tile_sources(const ConvShape& s, const T* x, const T* zeros, const int64_t* tap_off, const int64_t* tap_dh,
                  const int64_t* tap_dw, int64_t m0, int64_t mr, const T** src, int64_t* dst) {
  const int64_t hw = s.ho * s.wo, taps = s.kh * s.kw;
  int64_t b = m0 / hw, oh = (m0 % hw) / s.wo, ow = m0 % s.wo;
  for (int i = 0; i < kMR; ++i) {
    dst[i] = (b * s.out_hfull + oh * s.out_step + s.out_h0) * s.out_wfull + ow * s.out_step + s.out_w0;
    const int64_t h0 = oh * s.stride - s.pad_h, w0 = ow * s.stride - s.pad_w;
    if (h0 >= 0 && w0 >= 0 && h0 + s.kh <= s.h && w0 + s.kw <= s.w) {
      const T* base = x + ((b * s.h + h0) * s.wmem + w0) * s.pstride;
      for (int64_t t = 0; t < taps; ++t) src[t * kMR + i] = base + tap_off[t];
    } else {
      for (int64_t t = 0; t < taps; ++t) {
        int64_t hi = h0 + tap_dh[t], wi = w0 + tap_dw[t];
        if (s.replicate) {
          hi = std::min(std::max<int64_t>(hi, 0), s.h - 1);
          wi = std::min(std::max<int64_t>(wi, 0), s.w - 1);
        }
        const bool inside = hi >= 0 && hi < s.h && wi >= 0 && wi < s.w;
        src[t * kMR + i] = inside ? x + ((b * s.h + hi) * s.wmem + wi) * s.pstride : zeros;
      }
    }
    if (i + 1 < mr && ++ow == s.wo) {  // advance to the next pixel (a partial tile repeats its last one)
      ow = 0;
      if (++oh == s.ho) {
        oh = 0;
        ++b;
      }
    }
  }
}

}  // namespace

bool conv_bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

bool conv_f32_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}

namespace {

// Packed elements per (tap, channel) row of the weight: bf16 packs channel pairs side by side.
template <typename T>
constexpr int64_t kUnit = std::is_same_v<T, float> ? 1 : 2;

template <typename T>
void run_conv(const ConvShape& s, const T* x, const T* wpacked, const float* bias, const T* res, T* out) {
  const std::vector<T> zeros(static_cast<size_t>(s.c), T(0));
  const int64_t m = s.batch * s.ho * s.wo, taps = s.kh * s.kw;
  const int64_t tiles = (m + kMR - 1) / kMR, nblocks = s.np / 32;
#pragma omp parallel
  {
    std::vector<const T*> src(static_cast<size_t>(taps * kMR));
    std::vector<int64_t> tap_off(static_cast<size_t>(taps)), tap_dh(static_cast<size_t>(taps)),
        tap_dw(static_cast<size_t>(taps));
    int64_t dst[kMR];
    for (int64_t t = 0; t < taps; ++t) {
      tap_dh[t] = t / s.kw;
      tap_dw[t] = t % s.kw;
      tap_off[t] = (tap_dh[t] * s.wmem + tap_dw[t]) * s.pstride;
    }
#pragma omp for schedule(static)
    for (int64_t ti = 0; ti < tiles; ++ti) {
      const int64_t m0 = ti * kMR, mr = std::min<int64_t>(kMR, m - m0);
      tile_sources(s, x, zeros.data(), tap_off.data(), tap_dh.data(), tap_dw.data(), m0, mr, src.data(), dst);
      for (int64_t nb = 0; nb < nblocks; ++nb) {
        const bool half = s.n - nb * 32 <= 16;
        if constexpr (std::is_same_v<T, float>) {
          (half ? tile_f32<true> : tile_f32<false>)(s, src.data(), dst, wpacked, bias, res, out, mr, nb * 32);
        } else {
          (half ? tile_bf16<true> : tile_bf16<false>)(s, src.data(), dst, wpacked, bias, res, out, mr, nb * 32);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void conv2d_cl(const T* x, int64_t batch, int64_t h, int64_t w, int64_t c, const T* wpacked, int64_t kh, int64_t kw,
               int64_t n, int64_t stride, int64_t pad, int64_t ho, int64_t wo, const float* bias, const T* res, T* out,
               bool replicate) {
  const ConvShape s{batch, h, w, c, kh, kw, n, (n + 31) / 32 * 32, stride, pad, pad, ho, wo, 1, 0, 0, ho, wo, w, c,
                    replicate};
  run_conv(s, x, wpacked, bias, res, out);
}

template <typename T>
void conv2d_rows_cl(const T* xpad, int64_t batch, int64_t hp, int64_t wp, int64_t c, const T* wpacked, int64_t kh,
                    int64_t kw, int64_t n, const float* bias, const T* res, T* out) {
  // virtual pixel (hi, wi) = the kw * c contiguous values of pixels wi .. wi + kw - 1 of row hi
  const int64_t ho = hp - kh + 1, wo = wp - kw + 1;
  const ConvShape s{batch, hp, wo, kw * c, kh, 1, n, (n + 31) / 32 * 32, 1, 0, 0, ho, wo, 1, 0, 0, ho, wo, wp, c,
                    false};
  run_conv(s, xpad, wpacked, bias, res, out);
}

template <typename T>
void conv_transpose2d_k4s2p1_cl(const T* x, int64_t batch, int64_t h, int64_t w, int64_t c, const T* wpacked,
                                int64_t n, const float* bias, T* out, bool replicate) {
  const int64_t np = (n + 31) / 32 * 32;
  const int64_t phase_size = 4 * (c / kUnit<T>) * np * kUnit<T>;  // one packed 2x2 kernel
  for (int64_t py = 0; py < 2; ++py)
    for (int64_t px = 0; px < 2; ++px) {
      // output row 2q + py reads input rows q - 1, q (py = 0) or q, q + 1 (py = 1): a 2x2 conv, top/left pad 1 - p
      const ConvShape s{batch, h, w, c, 2, 2, n, np, 1, 1 - py, 1 - px, h, w, 2, py, px, 2 * h, 2 * w, w, c, replicate};
      run_conv(s, x, wpacked + (py * 2 + px) * phase_size, bias, static_cast<const T*>(nullptr), out);
    }
}

#define RF_INSTANTIATE(T)                                                                                        \
  template void conv2d_cl<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, \
                             int64_t, int64_t, int64_t, int64_t, const float*, const T*, T*, bool);            \
  template void conv2d_rows_cl<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, int64_t, int64_t,     \
                                  int64_t, const float*, const T*, T*);                                        \
  template void conv_transpose2d_k4s2p1_cl<T>(const T*, int64_t, int64_t, int64_t, int64_t, const T*, int64_t,  \
                                              const float*, T*, bool);
RF_INSTANTIATE(uint16_t)
RF_INSTANTIATE(float)
#undef RF_INSTANTIATE

}  // namespace rf
