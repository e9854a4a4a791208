#pragma once
#include <cstdint>

#include "philox.h"

namespace rf {
// out[r, j] = normal(keys[r], offset + j) for r < rows, j < n (row-major, out has rows * n floats).
void philox_randn_cpu(const uint64_t* keys, int64_t rows, int64_t n, uint64_t offset, float* out);
// out[j] = normal(key = (k0, k1), first + j) for j < n: one SIMD chunk, no threading (building block).
void randn_chunk(uint32_t k0, uint32_t k1, uint64_t first, int64_t n, float* out);
// Raw Philox4x32-10 blocks: counters (n, 4), keys (n, 2) -> out (n, 4).
void philox_randint4x_cpu(const uint32_t* counters, const uint32_t* keys, int64_t n, uint32_t* out);
// out[i] = derive_key(seed, images[i], step, stream).
void derive_keys_cpu(uint64_t seed, const int64_t* images, int64_t n, uint32_t step, uint32_t stream,
                     uint64_t* out);
}  // namespace rf
