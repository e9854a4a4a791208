#pragma once
// Channels-last CPU ops for the MAGE-Net enhancer (retina_fast/enhance.py, CPURunner). Tensors are
// row-major (B, H, W, C) float32 or bf16 bits (uint16_t, round-to-nearest-even stores); arithmetic is
// float32 and each output is rounded once. References:
//   upsample_bilinear_cl  F.interpolate(x, size=(ho, wo), mode="bilinear", align_corners=False) [+ res]
//   ca_residual_cl        retina_fast.models.magenet.channel_attention_ref(body, w_down, w_up) + x
#include <cstdint>

namespace rf {

// out (B, ho, wo, C) = bilinear resize of x (B, hi, wi, C) (PyTorch's half-pixel source positions, clamped
// at 0 and the last row/column) [+ res (B, ho, wo, C)].
template <typename T>
void upsample_bilinear_cl(const T* x, int64_t batch, int64_t hi, int64_t wi, int64_t c, int64_t ho, int64_t wo,
                          const T* res, T* out);

// out = body * sigmoid(w_up relu(w_down mean_P(body))) + x per image; body, x, out (B, P, C); w_down (R, C),
// w_up (C, R) float32 (1x1 conv weights without bias).
template <typename T>
void ca_residual_cl(const T* body, const T* x, int64_t batch, int64_t pixels, int64_t c, const float* w_down,
                    const float* w_up, int64_t r, T* out);

// Tests: run the scalar fallback (as on a CPU without AVX-512) instead of the AVX-512 kernels.
void enhance_ops_scalar_only(bool on);

}  // namespace rf
