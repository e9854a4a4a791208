// CUDA Philox normals: one thread per element, keys per row. Same integers as the CPU and Triton
// versions; normals differ only by device libm (logf/cosf/sqrtf, no fast-math).
#include <cuda_runtime.h>

#include "cuda/philox_cuda.h"
#include "philox.h"

namespace rf {
namespace {

__global__ void randn_kernel(const uint64_t* __restrict__ keys, int64_t n, uint64_t offset,
                             float* __restrict__ out) {
  const int64_t row = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const uint64_t key = keys[row];
  const uint64_t ctr = offset + static_cast<uint64_t>(j);
  const U32x4 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u,
                                static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  const float u0 = fmaxf(uint_to_uniform(r.v[0]), kMinUniform);
  const float u1 = uint_to_uniform(r.v[1]);
  out[row * n + j] = sqrtf(-2.0f * logf(u0)) * cosf(kTwoPi * u1);
}

}  // namespace

const char* philox_randn_cuda(const uint64_t* keys, int64_t rows, int64_t n, uint64_t offset, float* out,
                              uintptr_t stream) {
  if (rows == 0 || n == 0) return "";
  if (rows > 65535) return "philox_randn_cuda: more than 65535 rows";
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(rows));
  randn_kernel<<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(keys, n, offset, out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

const char* cuda_device_summary(int* count) {
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    return cudaGetErrorString(err);
  }
  return "";
}

}  // namespace rf
