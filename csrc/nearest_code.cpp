// Nearest-code lookup (retina_fast/ops/nearest_code.py): NumPy buffers in, checked here.
#include "cpu/nearest_code_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void nearest_code(py::array x, py::array codebook, py::array code_sqnorm, py::array idx, py::array dist) {
  require<float>(x, "x", 2);
  require<float>(codebook, "codebook", 2);
  require<float>(code_sqnorm, "code_sqnorm", 1);
  require<int64_t>(idx, "idx", 1);
  require<float>(dist, "dist", 1);
  const int64_t n = x.shape(0), d = x.shape(1), k = codebook.shape(0);
  if (codebook.shape(1) != d) throw py::value_error("codebook dim does not match x");
  if (code_sqnorm.shape(0) != k) throw py::value_error("code_sqnorm must have one entry per code");
  if (idx.shape(0) != n || dist.shape(0) != n) throw py::value_error("idx/dist must have one entry per row");
  if (k == 0) throw py::value_error("empty codebook");
  const auto* xp = static_cast<const float*>(x.data());
  const auto* cp = static_cast<const float*>(codebook.data());
  const auto* np_ = static_cast<const float*>(code_sqnorm.data());
  auto* ip = static_cast<int64_t*>(idx.mutable_data());
  auto* dp = static_cast<float*>(dist.mutable_data());
  py::gil_scoped_release nogil;
  ::rf::nearest_code_cpu(xp, cp, np_, n, d, k, ip, dp);
}

}  // namespace

void bind_nearest_code(py::module_& m) {
  m.def("nearest_code", &nearest_code, py::arg("x"), py::arg("codebook"), py::arg("code_sqnorm"),
        py::arg("idx"), py::arg("dist"),
        "Nearest codebook row by L2 for each row of x (n, d); writes idx (n,) int64 and squared dist (n,).");
}

}  // namespace rf_bind
