// Linear / softmax multi-head attention on a to_qkv output, channels-last (retina_fast/ops/attention.py).
#include "cpu/unet_ops_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void attention_cl(uintptr_t qkv, uintptr_t out, int64_t batch, int64_t pixels, int64_t heads, int64_t dim,
                  bool linear, bool bf16, py::object graph) {
  if (batch < 0 || pixels <= 0 || heads <= 0 || dim <= 0) throw py::value_error("attention_cl: bad shape");
  if (!qkv || !out) throw py::value_error("attention_cl: null pointer");
  submit(graph, [=] {
    if (bf16) {
      const auto* q = cptr<uint16_t>(qkv);
      auto* o = reinterpret_cast<uint16_t*>(out);
      linear ? ::rf::linear_attn_cl(q, batch, pixels, heads, dim, o) : ::rf::softmax_attn_cl(q, batch, pixels, heads, dim, o);
    } else {
      const auto* q = cptr<float>(qkv);
      auto* o = reinterpret_cast<float*>(out);
      linear ? ::rf::linear_attn_cl(q, batch, pixels, heads, dim, o) : ::rf::softmax_attn_cl(q, batch, pixels, heads, dim, o);
    }
  }, shape_name(linear ? "linear_attn" : "softmax_attn", {batch, pixels, heads, dim}));
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention_cl", &attention_cl, py::arg("qkv"), py::arg("out"), py::arg("batch"), py::arg("pixels"),
        py::arg("heads"), py::arg("dim"), py::arg("linear"), py::arg("bf16"), py::arg("graph") = py::none(),
        "Linear or softmax attention on a channels-last to_qkv output (B, P, 3 heads dim); data pointers.");
}

}  // namespace rf_bind
