#pragma once
#include <cstdint>

namespace rf {
// For each row x[i] (n, d): idx[i] = argmin_j ||x_i - c_j||^2 (lowest j on ties),
// dist[i] = max(||x_i||^2 - 2 x_i.c_j + ||c_j||^2, 0). code_sqnorm[j] = ||c_j||^2.
// Never forms the (n, k) matrix: rows are processed in small blocks against a transposed codebook.
void nearest_code_cpu(const float* x, const float* codebook, const float* code_sqnorm, int64_t n, int64_t d,
                      int64_t k, int64_t* idx, float* dist);
}  // namespace rf
