#pragma once
#include <cstdint>

namespace rf {
// All pointers are device pointers; `stream` is a cudaStream_t passed as an integer.
// Returns an empty string on success, else the CUDA error text.
const char* philox_randn_cuda(const uint64_t* keys, int64_t rows, int64_t n, uint64_t offset, float* out,
                              uintptr_t stream);
const char* cuda_device_summary(int* count);
}  // namespace rf
