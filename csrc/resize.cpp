// Bilinear resize (+ add), channels-last (retina_fast/ops/resize.py).
#include "cpu/enhance_ops_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void upsample_bilinear_cl(uintptr_t x, int64_t batch, int64_t hi, int64_t wi, int64_t c, int64_t ho, int64_t wo,
                          uintptr_t res, uintptr_t out, bool bf16) {
  if (batch < 0 || hi <= 0 || wi <= 0 || c <= 0 || ho <= 0 || wo <= 0)
    throw py::value_error("upsample_bilinear_cl: bad shape");
  if (!x || !out) throw py::value_error("upsample_bilinear_cl: null pointer");
  py::gil_scoped_release nogil;
  if (bf16)
    ::rf::upsample_bilinear_cl(cptr<uint16_t>(x), batch, hi, wi, c, ho, wo, cptr<uint16_t>(res), reinterpret_cast<uint16_t*>(out));
  else
    ::rf::upsample_bilinear_cl(cptr<float>(x), batch, hi, wi, c, ho, wo, cptr<float>(res), reinterpret_cast<float*>(out));
}

}  // namespace

void bind_resize(py::module_& m) {
  m.def("upsample_bilinear_cl", &upsample_bilinear_cl, py::arg("x"), py::arg("batch"), py::arg("hi"), py::arg("wi"),
        py::arg("c"), py::arg("ho"), py::arg("wo"), py::arg("res"), py::arg("out"), py::arg("bf16"),
        "Channels-last bilinear resize (align_corners=False) [+ res] on data pointers; see csrc/cpu/enhance_ops_cpu.h.");
  m.def("enhance_ops_scalar_only", &::rf::enhance_ops_scalar_only, py::arg("on"),
        "Tests: make upsample_bilinear_cl / ca_residual_cl use their scalar fallback (as without AVX-512).");
}

}  // namespace rf_bind
