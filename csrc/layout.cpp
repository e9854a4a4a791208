// Channel concat and elementwise add of channels-last tensors (retina_fast/ops/concat.py, ops/add.py).
#include "cpu/unet_ops_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void concat_channels_cl(uintptr_t a, uintptr_t b, uintptr_t out, int64_t rows, int64_t bytes_a, int64_t bytes_b,
                        py::object graph) {
  if (rows < 0 || bytes_a <= 0 || bytes_b <= 0) throw py::value_error("concat_channels_cl: bad shape");
  if (!a || !b || !out) throw py::value_error("concat_channels_cl: null pointer");
  submit(graph, [=] { ::rf::concat_rows(cptr<uint8_t>(a), cptr<uint8_t>(b), reinterpret_cast<uint8_t*>(out), rows, bytes_a, bytes_b); }, shape_name("concat", {rows, bytes_a, bytes_b}));
}

void add_cl(uintptr_t a, uintptr_t b, uintptr_t out, int64_t n, bool bf16, py::object graph) {
  if (n < 0) throw py::value_error("add_cl: bad size");
  if (!a || !b || !out) throw py::value_error("add_cl: null pointer");
  submit(graph, [=] {
    if (bf16)
      ::rf::add_cl(cptr<uint16_t>(a), cptr<uint16_t>(b), n, mptr<uint16_t>(out));
    else
      ::rf::add_cl(cptr<float>(a), cptr<float>(b), n, mptr<float>(out));
  }, shape_name("add", {n}));
}

}  // namespace

void bind_layout(py::module_& m) {
  m.def("concat_channels_cl", &concat_channels_cl, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("rows"),
        py::arg("bytes_a"), py::arg("bytes_b"), py::arg("graph") = py::none(),
        "out row r = a row r (bytes_a) then b row r (bytes_b): channel concat of channels-last tensors.");
  m.def("add_cl", &add_cl, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("n"), py::arg("bf16"),
        py::arg("graph") = py::none(), "out = a + b elementwise over n values (fp32 arithmetic, one rounding).");
}

}  // namespace rf_bind
