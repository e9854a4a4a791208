// Fused sampler step with in-loop noise (retina_fast/ops/sampler_step.py): NumPy buffers in, checked here.
#include "cpu/sampler_step_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void sampler_step(py::array x, py::array eps, py::object x0_prev, py::object keys, py::tuple coef, bool clip,
                  py::array out, py::array x0_out) {
  require<float>(x, "x", 2);
  require<float>(eps, "eps", 2);
  require<float>(out, "out", 2);
  require<float>(x0_out, "x0_out", 2);
  const int64_t b = x.shape(0), n = x.shape(1);
  for (const py::array* a : {&eps, &out, &x0_out})
    if (a->shape(0) != b || a->shape(1) != n) throw py::value_error("x, eps, out, x0_out must share one shape");
  if (coef.size() != 6) throw py::value_error("coef must be (inv_a1, s1, cx, c0, cp, std)");
  ::rf::StepCoefC c{coef[0].cast<float>(), coef[1].cast<float>(), coef[2].cast<float>(),
                  coef[3].cast<float>(), coef[4].cast<float>(), coef[5].cast<float>()};
  const float* xp = nullptr;
  py::array xp_arr, keys_arr;
  if (!x0_prev.is_none()) {
    xp_arr = x0_prev.cast<py::array>();
    require<float>(xp_arr, "x0_prev", 2);
    if (xp_arr.shape(0) != b || xp_arr.shape(1) != n) throw py::value_error("x0_prev must match x");
    xp = static_cast<const float*>(xp_arr.data());
  }
  const uint64_t* kp = nullptr;
  if (!keys.is_none()) {
    keys_arr = keys.cast<py::array>();
    require<uint64_t>(keys_arr, "keys", 1);
    if (keys_arr.shape(0) != b) throw py::value_error("one key per image expected");
    kp = static_cast<const uint64_t*>(keys_arr.data());
  }
  const auto* xd = static_cast<const float*>(x.data());
  const auto* ed = static_cast<const float*>(eps.data());
  auto* od = static_cast<float*>(out.mutable_data());
  auto* x0d = static_cast<float*>(x0_out.mutable_data());
  py::gil_scoped_release nogil;
  ::rf::sampler_step_cpu(xd, ed, xp, kp, b, n, c, clip, od, x0d);
}

}  // namespace

void bind_sampler_step(py::module_& m) {
  m.def("sampler_step", &sampler_step, py::arg("x"), py::arg("eps"), py::arg("x0_prev"), py::arg("keys"),
        py::arg("coef"), py::arg("clip"), py::arg("out"), py::arg("x0_out"),
        "Fused generic sampler update with in-loop Philox noise; arrays are (batch, n) float32.");
}

}  // namespace rf_bind
