// Channel attention + residual, channels-last (retina_fast/ops/channel_attention.py).
#include "cpu/enhance_ops_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void ca_residual_cl(uintptr_t body, uintptr_t x, int64_t batch, int64_t pixels, int64_t c, uintptr_t w_down,
                    uintptr_t w_up, int64_t r, uintptr_t out, bool bf16) {
  if (batch < 0 || pixels <= 0 || c <= 0 || r <= 0) throw py::value_error("ca_residual_cl: bad shape");
  if (!body || !x || !w_down || !w_up || !out) throw py::value_error("ca_residual_cl: null pointer");
  py::gil_scoped_release nogil;
  const float *wd = cptr<float>(w_down), *wu = cptr<float>(w_up);
  if (bf16)
    ::rf::ca_residual_cl(cptr<uint16_t>(body), cptr<uint16_t>(x), batch, pixels, c, wd, wu, r, reinterpret_cast<uint16_t*>(out));
  else
    ::rf::ca_residual_cl(cptr<float>(body), cptr<float>(x), batch, pixels, c, wd, wu, r, reinterpret_cast<float*>(out));
}

}  // namespace

void bind_channel_attention(py::module_& m) {
  m.def("ca_residual_cl", &ca_residual_cl, py::arg("body"), py::arg("x"), py::arg("batch"), py::arg("pixels"),
        py::arg("c"), py::arg("w_down"), py::arg("w_up"), py::arg("r"), py::arg("out"), py::arg("bf16"),
        "Channel attention of body (B, P, C) times body plus x, channels-last, on data pointers.");
}

}  // namespace rf_bind
