// Nearest-code lookup on the CPU (VQ quantisation and the K-Means assignment step).
#include "cpu/nearest_code_cpu.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace rf {
namespace {

constexpr int64_t kRows = 8;     // rows per block (register reuse of each codebook column)
constexpr int64_t kCodes = 256;  // codes per tile (scores stay in L1)

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void score_tile(const float* __restrict x, int64_t rows, int64_t d, const float* __restrict ct, int64_t k,
                int64_t j0, int64_t jn, const float* __restrict sqn, float* __restrict score) {
  // score[r, j] = ||c_j||^2 - 2 x_r . c_j for j in [j0, j0 + jn); ct is the (d, k) transposed codebook.
  for (int64_t r = 0; r < rows; ++r) {
    float* s = score + r * kCodes;
#pragma omp simd
    for (int64_t j = 0; j < jn; ++j) s[j] = 0.0f;
    for (int64_t c = 0; c < d; ++c) {
      const float xv = x[r * d + c];
      const float* col = ct + c * k + j0;
#pragma omp simd
      for (int64_t j = 0; j < jn; ++j) s[j] += xv * col[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < jn; ++j) s[j] = sqn[j0 + j] - 2.0f * s[j];
  }
}

}  // namespace

void nearest_code_cpu(const float* x, const float* codebook, const float* code_sqnorm, int64_t n, int64_t d,
                      int64_t k, int64_t* idx, float* dist) {
  std::vector<float> ct(static_cast<size_t>(d * k));
  for (int64_t j = 0; j < k; ++j)
    for (int64_t c = 0; c < d; ++c) ct[c * k + j] = codebook[j * d + c];
  const int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel
  {
    std::vector<float> score(kRows * kCodes);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kRows;
      const int64_t rows = std::min(kRows, n - i0);
      float best[kRows];
      int64_t arg[kRows];
      for (int64_t r = 0; r < rows; ++r) {
        best[r] = std::numeric_limits<float>::infinity();
        arg[r] = 0;
      }
      for (int64_t j0 = 0; j0 < k; j0 += kCodes) {
        const int64_t jn = std::min(kCodes, k - j0);
        score_tile(x + i0 * d, rows, d, ct.data(), k, j0, jn, code_sqnorm, score.data());
        for (int64_t r = 0; r < rows; ++r) {
          const float* s = score.data() + r * kCodes;
          for (int64_t j = 0; j < jn; ++j) {
            if (s[j] < best[r]) {  // strict: the lowest index wins ties, as torch.argmin
              best[r] = s[j];
              arg[r] = j0 + j;
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + (i0 + r) * d;
        float xx = 0.0f;
        for (int64_t c = 0; c < d; ++c) xx += xr[c] * xr[c];
        idx[i0 + r] = arg[r];
        dist[i0 + r] = std::max(best[r] + xx, 0.0f);
      }
    }
  }
}

}  // namespace rf
