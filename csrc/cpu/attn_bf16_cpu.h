#pragma once
// Linear attention for one (image, head) with AVX512-BF16 dot products (head dim 32; see attn_bf16_cpu.cpp).
#include <cstdint>

namespace rf {

// Scratch floats/bf16 needed by lin_attn_bf16_item for `pixels` tokens (head dim 32), in bytes.
int64_t lin_attn_bf16_scratch_bytes(int64_t pixels);

// Same contract as linear_attn_cl's per-head work (unet_ops_cpu.h) for bf16 storage and head dim 32:
// qkv rows of stride 3 * heads * 32, head h; writes out rows of stride heads * 32. Call only when
// conv_bf16_supported() (conv_cpu.h) is true.
void lin_attn_bf16_item(const uint16_t* qkv, int64_t pixels, int64_t heads, int64_t h, uint16_t* out,
                        void* scratch);

}  // namespace rf
