// GroupNorm + FiLM + SiLU (+ residual), channels-last (retina_fast/ops/group_norm_silu.py); records into OpGraphs.
#include "cpu/unet_ops_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void gn_silu_cl(uintptr_t x, uintptr_t out, uintptr_t residual, int64_t batch, int64_t pixels, int64_t channels,
                int64_t groups, uintptr_t weight, uintptr_t bias, uintptr_t scale, uintptr_t shift,
                int64_t film_stride, bool act, float eps, bool bf16, py::object graph) {
  if (batch < 0 || pixels < 0 || channels <= 0 || groups <= 0 || channels % groups != 0)
    throw py::value_error("gn_silu_cl: groups must divide channels > 0");
  if (!x || !out || !weight || !bias) throw py::value_error("gn_silu_cl: null pointer");
  if ((scale || shift) && film_stride < channels) throw py::value_error("gn_silu_cl: film_stride < channels");
  const float *w = cptr<float>(weight), *b = cptr<float>(bias), *sc = cptr<float>(scale), *sh = cptr<float>(shift);
  submit(graph, [=] {
    if (bf16)
      ::rf::gn_silu_cl(cptr<uint16_t>(x), batch, pixels, channels, groups, w, b, sc, sh, film_stride,
                     cptr<uint16_t>(residual), act, eps, reinterpret_cast<uint16_t*>(out));
    else
      ::rf::gn_silu_cl(cptr<float>(x), batch, pixels, channels, groups, w, b, sc, sh, film_stride,
                     cptr<float>(residual), act, eps, reinterpret_cast<float*>(out));
  }, shape_name(act ? "gn_silu" : "gn", {batch, pixels, channels}));
}

}  // namespace

void bind_group_norm_silu(py::module_& m) {
  m.def("gn_silu_cl", &gn_silu_cl, py::arg("x"), py::arg("out"), py::arg("residual"), py::arg("batch"),
        py::arg("pixels"), py::arg("channels"), py::arg("groups"), py::arg("weight"), py::arg("bias"),
        py::arg("scale"), py::arg("shift"), py::arg("film_stride"), py::arg("act"), py::arg("eps"), py::arg("bf16"), py::arg("graph") = py::none(),
        "Channels-last GroupNorm -> x (1 + scale) + shift -> SiLU [+ residual] on data pointers (B, P, C).");
}

}  // namespace rf_bind
