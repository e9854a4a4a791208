// Direct convolutions, channels-last, bf16 or fp32 storage (retina_fast/ops/conv.py); records into OpGraphs.
#include <stdexcept>

#include "cpu/conv_cpu.h"

#include "bindings.h"

namespace rf_bind {
namespace {

void require_conv_isa(bool bf16, const char* op) {
  if (bf16 ? !::rf::conv_bf16_supported() : !::rf::conv_f32_supported())
    throw std::runtime_error(std::string(op) + (bf16 ? ": this CPU lacks AVX512-BF16" : ": this CPU lacks AVX-512"));
}

void conv2d_cl(uintptr_t x, int64_t batch, int64_t h, int64_t w, int64_t c, uintptr_t wpacked, int64_t kh, int64_t kw,
               int64_t n, int64_t stride, int64_t pad, int64_t ho, int64_t wo, uintptr_t bias, uintptr_t res,
               uintptr_t out, bool bf16, bool replicate, py::object graph) {
  require_conv_isa(bf16, "conv2d_cl");
  if (batch < 0 || h <= 0 || w <= 0 || c <= 0 || (bf16 && c % 2) || kh <= 0 || kw <= 0 || n <= 0 || stride <= 0 ||
      pad < 0)
    throw py::value_error("conv2d_cl: bad shape (channels must be positive, and even in bf16)");
  if (ho != (h + 2 * pad - kh) / stride + 1 || wo != (w + 2 * pad - kw) / stride + 1 || ho <= 0 || wo <= 0)
    throw py::value_error("conv2d_cl: output size does not match input, kernel, stride and padding");
  if (!x || !wpacked || !out) throw py::value_error("conv2d_cl: null pointer");
  submit(graph, [=] {
    if (bf16)
      ::rf::conv2d_cl(cptr<uint16_t>(x), batch, h, w, c, cptr<uint16_t>(wpacked), kh, kw, n, stride, pad, ho, wo,
                    cptr<float>(bias), cptr<uint16_t>(res), reinterpret_cast<uint16_t*>(out), replicate);
    else
      ::rf::conv2d_cl(cptr<float>(x), batch, h, w, c, cptr<float>(wpacked), kh, kw, n, stride, pad, ho, wo,
                    cptr<float>(bias), cptr<float>(res), reinterpret_cast<float*>(out), replicate);
  }, shape_name("conv", {batch, h, w, c, n, kh, kw, stride}));
}

void conv2d_rows_cl(uintptr_t xpad, int64_t batch, int64_t hp, int64_t wp, int64_t c, uintptr_t wpacked, int64_t kh,
                    int64_t kw, int64_t n, uintptr_t bias, uintptr_t res, uintptr_t out, bool bf16, py::object graph) {
  require_conv_isa(bf16, "conv2d_rows_cl");
  if (batch < 0 || c <= 0 || kh <= 0 || kw <= 0 || (bf16 && (kw * c) % 2) || n <= 0 || hp < kh || wp < kw)
    throw py::value_error("conv2d_rows_cl: bad shape (kw * channels must be even in bf16; input at least the kernel)");
  if (!xpad || !wpacked || !out) throw py::value_error("conv2d_rows_cl: null pointer");
  submit(graph, [=] {
    if (bf16)
      ::rf::conv2d_rows_cl(cptr<uint16_t>(xpad), batch, hp, wp, c, cptr<uint16_t>(wpacked), kh, kw, n, cptr<float>(bias),
                         cptr<uint16_t>(res), reinterpret_cast<uint16_t*>(out));
    else
      ::rf::conv2d_rows_cl(cptr<float>(xpad), batch, hp, wp, c, cptr<float>(wpacked), kh, kw, n, cptr<float>(bias),
                         cptr<float>(res), reinterpret_cast<float*>(out));
  }, shape_name("conv_rows", {batch, hp, wp, c, n, kh, kw}));
}

void conv_transpose2d_k4s2p1_cl(uintptr_t x, int64_t batch, int64_t h, int64_t w, int64_t c, uintptr_t wpacked,
                                int64_t n, uintptr_t bias, uintptr_t out, bool bf16, bool replicate, py::object graph) {
  require_conv_isa(bf16, "conv_transpose2d_k4s2p1_cl");
  if (batch < 0 || h <= 0 || w <= 0 || c <= 0 || (bf16 && c % 2) || n <= 0)
    throw py::value_error("conv_transpose2d_k4s2p1_cl: bad shape (channels must be positive, and even in bf16)");
  if (!x || !wpacked || !out) throw py::value_error("conv_transpose2d_k4s2p1_cl: null pointer");
  submit(graph, [=] {
    if (bf16)
      ::rf::conv_transpose2d_k4s2p1_cl(cptr<uint16_t>(x), batch, h, w, c, cptr<uint16_t>(wpacked), n, cptr<float>(bias),
                                     reinterpret_cast<uint16_t*>(out), replicate);
    else
      ::rf::conv_transpose2d_k4s2p1_cl(cptr<float>(x), batch, h, w, c, cptr<float>(wpacked), n, cptr<float>(bias),
                                     reinterpret_cast<float*>(out), replicate);
  }, shape_name("conv_t", {batch, h, w, c, n}));
}

}  // namespace

void bind_conv(py::module_& m) {
  m.def("conv_bf16_supported", &::rf::conv_bf16_supported, "Whether this CPU can run the bf16 direct convolutions.");
  m.def("conv_f32_supported", &::rf::conv_f32_supported, "Whether this CPU can run the fp32 direct convolutions.");
  m.def("conv2d_cl", &conv2d_cl, py::arg("x"), py::arg("batch"), py::arg("h"), py::arg("w"), py::arg("c"),
        py::arg("wpacked"), py::arg("kh"), py::arg("kw"), py::arg("n"), py::arg("stride"), py::arg("pad"),
        py::arg("ho"), py::arg("wo"), py::arg("bias"), py::arg("res"), py::arg("out"), py::arg("bf16"),
        py::arg("replicate") = false, py::arg("graph") = py::none(),
        "Direct channels-last convolution (bf16 or fp32 storage) on data pointers; see csrc/cpu/conv_cpu.h.");
  m.def("conv2d_rows_cl", &conv2d_rows_cl, py::arg("xpad"), py::arg("batch"), py::arg("hp"), py::arg("wp"),
        py::arg("c"), py::arg("wpacked"), py::arg("kh"), py::arg("kw"), py::arg("n"), py::arg("bias"), py::arg("res"),
        py::arg("out"), py::arg("bf16"), py::arg("graph") = py::none(),
        "Row form of a stride-1 few-channel conv on a padded channels-last input; data pointers.");
  m.def("conv_transpose2d_k4s2p1_cl", &conv_transpose2d_k4s2p1_cl, py::arg("x"), py::arg("batch"),
        py::arg("h"), py::arg("w"), py::arg("c"), py::arg("wpacked"), py::arg("n"), py::arg("bias"), py::arg("out"),
        py::arg("bf16"), py::arg("replicate") = false, py::arg("graph") = py::none(),
        "ConvTranspose2d(4, stride 2, padding 1) on channels-last input as four direct 2x2 convs; data pointers.");
}

}  // namespace rf_bind
