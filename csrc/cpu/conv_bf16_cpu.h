#pragma once
// Direct bf16 convolution on channels-last tensors with AVX512-BF16 (vdpbf16ps), fp32 accumulation.
// Used by the cpu backend's fused U-Net for its small-image convolutions, where oneDNN's per-call cost
// (~30 us) is comparable to the arithmetic (retina_fast/backends/cpu_unet.py).
#include <cstdint>

namespace rf {

// True when this CPU can run conv2d_bf16_cl (AVX512-F/BW/VL + AVX512-BF16).
bool conv_bf16_supported();

// Packed weight layout: (KH * KW, C / 2, Np, 2) bf16 bits with Np = N rounded up to a multiple of 32:
// element [t, c2, n, j] = weight[n, 2 c2 + j, t / KW, t % KW] (zero for n >= N).
//
// out[b, ho, wo, n] = bias[n] + sum_{kh, kw, c} x[b, ho s - p + kh, wo s - p + kw, c] w[n, c, kh, kw]
//                     (+ res[b, ho, wo, n]), rounded to bf16 (nearest even). Outside the image the input is
// zero, or with `replicate` the nearest edge pixel (padding_mode="replicate": row and column clamped).
// x (B, H, W, C), C even; res, out (B, Ho, Wo, N); bias (N,) float32 or null; res null or bf16.
void conv2d_bf16_cl(const uint16_t* x, int64_t batch, int64_t h, int64_t w, int64_t c, const uint16_t* wpacked,
                    int64_t kh, int64_t kw, int64_t n, int64_t stride, int64_t pad, int64_t ho, int64_t wo,
                    const float* bias, const uint16_t* res, uint16_t* out, bool replicate = false);

// Row form of a stride-1 convolution for few input channels: xpad (B, Hp, Wp, C) is the already padded
// input, and the kw taps of a kernel row are read as kw * C contiguous values (C * kw even), so the
// reduction per tap is kw times longer. wpacked packs the (N, kw * C, kh, 1) kernel
// w'[n, j * C + c, i, 0] = w[n, c, i, j]. out (B, Hp - kh + 1, Wp - kw + 1, N).
void conv2d_rows_bf16_cl(const uint16_t* xpad, int64_t batch, int64_t hp, int64_t wp, int64_t c,
                         const uint16_t* wpacked, int64_t kh, int64_t kw, int64_t n, const float* bias,
                         const uint16_t* res, uint16_t* out);

// ConvTranspose2d(kernel 4, stride 2, padding 1): x (B, H, W, C) -> out (B, 2H, 2W, N), as four 2x2
// convolutions, one per output phase (py, px). wpacked holds the four 2x2 kernels in the layout above,
// phase py * 2 + px first index: kernel[n, c, dy, dx] = weight_t[c, n, 3 - py - 2 dy, 3 - px - 2 dx]
// (weight_t is the ConvTranspose2d weight (C, N, 4, 4)). With `replicate` the input rows/columns -1 and H / W
// read the edge pixels instead of zero: ConvTranspose2d(4, 2, padding 3) of x padded by 1 by replication
// (the VQ-GAN decoder's upsampling).
void conv_transpose2d_k4s2p1_bf16_cl(const uint16_t* x, int64_t batch, int64_t h, int64_t w, int64_t c,
                                     const uint16_t* wpacked, int64_t n, const float* bias, uint16_t* out,
                                     bool replicate = false);

}  // namespace rf
