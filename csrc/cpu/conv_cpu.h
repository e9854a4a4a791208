#pragma once
// Direct convolutions on channels-last tensors, bf16 (AVX512-BF16 vdpbf16ps) or fp32 (AVX-512 FMA) storage,
// fp32 accumulation. Used by the cpu backend's fused U-Net and decoder, where oneDNN's per-call cost (~30 us)
// is comparable to the arithmetic, and because every output element is computed from its own pixel's taps in
// a fixed order: results do not depend on the batch size, the batch split or a pixel's tile position
// (oneDNN's kernels are chosen per problem size, so a batch of 3 and a batch of 8 may round differently).
#include <cstdint>

namespace rf {

// True when this CPU can run the bf16 entry points (AVX512-F/BW/VL + AVX512-BF16).
bool conv_bf16_supported();
// True when this CPU can run the fp32 entry points (AVX512-F/VL).
bool conv_f32_supported();

// Packed weight layout, with Np = N rounded up to a multiple of 32 (zero for n >= N):
//   bf16: (KH * KW, C / 2, Np, 2) bf16 bits, element [t, c2, n, j] = weight[n, 2 c2 + j, t / KW, t % KW]
//   fp32: (KH * KW, C, Np) float,            element [t, c, n]     = weight[n, c, t / KW, t % KW]
//
// out[b, ho, wo, n] = bias[n] + sum_{kh, kw, c} x[b, ho s - p + kh, wo s - p + kw, c] w[n, c, kh, kw]
//                     (+ res[b, ho, wo, n]), summed in fp32 in the order (tap, channel) and, for bf16, rounded
// to bf16 once (nearest even). Outside the image the input is zero, or with `replicate` the nearest edge pixel
// (padding_mode="replicate": row and column clamped). x (B, H, W, C) (bf16: C even); res, out (B, Ho, Wo, N);
// bias (N,) float32 or null; res null or of x's storage type. T = uint16_t (bf16 bits) or float.
template <typename T>
void conv2d_cl(const T* x, int64_t batch, int64_t h, int64_t w, int64_t c, const T* wpacked, int64_t kh,
               int64_t kw, int64_t n, int64_t stride, int64_t pad, int64_t ho, int64_t wo, const float* bias,
               const T* res, T* out, bool replicate = false);

// Row form of a stride-1 convolution for few input channels: xpad (B, Hp, Wp, C) is the already padded
// input, and the kw taps of a kernel row are read as kw * C contiguous values (bf16: C * kw even), so the
// reduction per tap is kw times longer. wpacked packs the (N, kw * C, kh, 1) kernel
// w'[n, j * C + c, i, 0] = w[n, c, i, j]. out (B, Hp - kh + 1, Wp - kw + 1, N).
template <typename T>
void conv2d_rows_cl(const T* xpad, int64_t batch, int64_t hp, int64_t wp, int64_t c, const T* wpacked, int64_t kh,
                    int64_t kw, int64_t n, const float* bias, const T* res, T* out);

// ConvTranspose2d(kernel 4, stride 2, padding 1): x (B, H, W, C) -> out (B, 2H, 2W, N), as four 2x2
// convolutions, one per output phase (py, px). wpacked holds the four 2x2 kernels in the layout above,
// phase py * 2 + px first index: kernel[n, c, dy, dx] = weight_t[c, n, 3 - py - 2 dy, 3 - px - 2 dx]
// (weight_t is the ConvTranspose2d weight (C, N, 4, 4)). With `replicate` the input rows/columns -1 and H / W
// read the edge pixels instead of zero: ConvTranspose2d(4, 2, padding 3) of x padded by 1 by replication
// (the VQ-GAN decoder's upsampling).
template <typename T>
void conv_transpose2d_k4s2p1_cl(const T* x, int64_t batch, int64_t h, int64_t w, int64_t c, const T* wpacked,
                                int64_t n, const float* bias, T* out, bool replicate = false);

}  // namespace rf
