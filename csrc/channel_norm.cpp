// Channel LayerNorm without gamma, channels-last (retina_fast/ops/channel_norm.py); records into OpGraphs.
#include "cpu/unet_ops_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void channel_norm_cl(uintptr_t x, uintptr_t out, int64_t rows, int64_t channels, float eps, bool bf16,
                     py::object graph) {
  if (rows < 0 || channels <= 0) throw py::value_error("channel_norm_cl: bad shape");
  if (!x || !out) throw py::value_error("channel_norm_cl: null pointer");
  submit(graph, [=] {
    if (bf16)
      ::rf::channel_norm_cl(cptr<uint16_t>(x), rows, channels, eps, reinterpret_cast<uint16_t*>(out));
    else
      ::rf::channel_norm_cl(cptr<float>(x), rows, channels, eps, reinterpret_cast<float*>(out));
  }, shape_name("channel_norm", {rows, channels}));
}

}  // namespace

void bind_channel_norm(py::module_& m) {
  m.def("channel_norm_cl", &channel_norm_cl, py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("channels"),
        py::arg("eps"), py::arg("bf16"), py::arg("graph") = py::none(), "LayerNorm over C of each row of x (rows, C), no affine; data pointers.");
}

}  // namespace rf_bind
