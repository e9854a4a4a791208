#pragma once
// Fused channels-last ops for the CPU U-Net / decoder (retina_fast/ops/*.py, recorded by retina_fast/backends/cpu_graph.py).
//
// Every tensor is channels-last, i.e. row-major (B, P, C) with P = H * W pixels, stored as float32 or as
// bf16 bits (uint16_t); all arithmetic is float32. Storage type T is float or uint16_t (bf16, written
// with round-to-nearest-even). The reference for each op is the PyTorch module it replaces:
//   gn_silu_cl        retina_fast.ops.group_norm_silu.group_norm_silu_ref (+ an optional residual added last)
//   channel_norm_cl   retina_fast.ops.channel_norm.channel_norm_ref without gamma (folded into to_qkv)
//   linear_attn_cl    retina_fast.ops.attention.linear_attention_ref on a to_qkv output
//   softmax_attn_cl   retina_fast.ops.attention.softmax_attention_ref on a to_qkv output
#include <cstdint>

namespace rf {

// y = act(GN(x) * (1 + scale) + shift) [+ residual]; weight/bias (C,), scale/shift (B, C) or null,
// residual (B, P, C) or null. scale[b, c] is scale[b * film_stride + c] (rows of a wider FiLM matrix).
template <typename T>
void gn_silu_cl(const T* x, int64_t batch, int64_t pixels, int64_t channels, int64_t groups, const float* weight,
                const float* bias, const float* scale, const float* shift, int64_t film_stride, const T* residual,
                bool act, float eps, T* out);

// out row r = bytes_a bytes of a's row r, then bytes_b bytes of b's row r (channel concat, channels-last).
void concat_rows(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t rows, int64_t bytes_a, int64_t bytes_b);

// out = a + b over n values (fp32 arithmetic, one rounding): an unfused residual add.
template <typename T>
void add_cl(const T* a, const T* b, int64_t n, T* out);

// y = (x - mean_C(x)) / sqrt(var_C(x) + eps) per row of x (rows, C).
template <typename T>
void channel_norm_cl(const T* x, int64_t rows, int64_t channels, float eps, T* out);

// qkv (B, P, 3 * heads * d) with channel s * heads * d + h * d + j (s = q, k, v) -> out (B, P, heads * d),
// channel h * d + e. Linear: softmax_d(q) d^-1/2 (softmax_P(k)^T v); softmax: softmax(q k^T / sqrt d) v.
template <typename T>
void linear_attn_cl(const T* qkv, int64_t batch, int64_t pixels, int64_t heads, int64_t dim, T* out);
template <typename T>
void softmax_attn_cl(const T* qkv, int64_t batch, int64_t pixels, int64_t heads, int64_t dim, T* out);

}  // namespace rf
