// retina_fast._C: validates arguments and dispatches to csrc/cpu and csrc/cuda.
//
// CPU tensors arrive as NumPy arrays (torch.Tensor.numpy() shares memory); shapes, dtypes and
// contiguity are checked here. CUDA tensors arrive as raw device pointers plus the caller's stream; the
// Python wrapper (retina_fast/_ext.py) checks device, dtype and contiguity before passing them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <stdexcept>
#include <vector>
#include <string>

#include "cpu/philox_cpu.h"
#include "cpu/nearest_code_cpu.h"
#include "cpu/sampler_step_cpu.h"
#include "cpu/unet_ops_cpu.h"
#include "cpu/conv_cpu.h"
#include "cpu/enhance_ops_cpu.h"
#if defined(RETINA_FAST_WITH_CUDA)
#include "cuda/philox_cuda.h"
#endif

namespace py = pybind11;

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

template <typename T>
void require(const py::array& a, const char* name, int ndim) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw py::type_error(std::string(name) + ": wrong dtype " + std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) + " dims, got " +
                          std::to_string(a.ndim()));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": must be C-contiguous");
}

void randn_cpu(py::array keys, uint64_t offset, py::array out) {
  require<uint64_t>(keys, "keys", 1);
  require<float>(out, "out", 2);
  if (out.shape(0) != keys.shape(0)) throw py::value_error("out.shape[0] must equal len(keys)");
  if (!out.writeable()) throw py::value_error("out is read-only");
  const auto* k = static_cast<const uint64_t*>(keys.data());
  auto* o = static_cast<float*>(out.mutable_data());
  const int64_t rows = out.shape(0), n = out.shape(1);
  py::gil_scoped_release nogil;
  rf::philox_randn_cpu(k, rows, n, offset, o);
}

py::array randint4x(py::array counters, py::array keys) {
  require<uint32_t>(counters, "counters", 2);
  require<uint32_t>(keys, "keys", 2);
  if (counters.shape(1) != 4 || keys.shape(1) != 2 || counters.shape(0) != keys.shape(0))
    throw py::value_error("counters must be (n, 4) and keys (n, 2)");
  const int64_t n = counters.shape(0);
  CArray<uint32_t> out({n, static_cast<int64_t>(4)});
  rf::philox_randint4x_cpu(static_cast<const uint32_t*>(counters.data()),
                           static_cast<const uint32_t*>(keys.data()), n, out.mutable_data());
  return out;
}

py::array derive_keys(uint64_t seed, py::array images, uint32_t step, uint32_t stream) {
  require<int64_t>(images, "images", 1);
  const int64_t n = images.shape(0);
  const auto* im = static_cast<const int64_t*>(images.data());
  for (int64_t i = 0; i < n; ++i)
    if (im[i] < 0 || im[i] > 0xffffffffLL) throw py::value_error("image index out of range [0, 2^32)");
  CArray<uint64_t> out(n);
  rf::derive_keys_cpu(seed, im, n, step, stream, out.mutable_data());
  return out;
}

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
  rf::nearest_code_cpu(xp, cp, np_, n, d, k, ip, dp);
}

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
  rf::StepCoefC c{coef[0].cast<float>(), coef[1].cast<float>(), coef[2].cast<float>(),
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
  rf::sampler_step_cpu(xd, ed, xp, kp, b, n, c, clip, od, x0d);
}

// ---- fused channels-last U-Net ops ------------------------------------------------------------------
// Hot path (~100 calls per U-Net step): tensors arrive as raw data pointers, like the CUDA entry points.
// The Python wrappers in retina_fast/backends/cpu_unet.py check device, dtype, channels-last contiguity
// and shapes before calling; here only the scalar arguments are checked.
//
// Every op takes an optional `graph` (an OpGraph): instead of running, the op is appended to it, and
// OpGraph.run() later replays the whole sequence in one call without the GIL -- the CPU counterpart of a
// CUDA graph: pointers and shapes are fixed at capture, so the caller must keep the buffers alive and
// refill the inputs in place.

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

struct OpGraph {
  std::vector<std::function<void()>> ops;
  std::vector<std::string> names;  // "kind shape" per op, for profile()
  void run() {
    py::gil_scoped_release nogil;
    for (const auto& op : ops) op();
  }
  // Replay `repeats` times timing every op; returns [(name, median seconds)] in op order. The per-op
  // timer (steady_clock, ~20 ns) is the only overhead, so the sum is close to one run().
  std::vector<std::pair<std::string, double>> profile(int repeats) {
    if (repeats < 1) throw py::value_error("OpGraph.profile: repeats must be >= 1");
    std::vector<std::vector<double>> t(ops.size(), std::vector<double>(repeats));
    {
      py::gil_scoped_release nogil;
      for (int r = 0; r < repeats; ++r)
        for (size_t i = 0; i < ops.size(); ++i) {
          auto t0 = std::chrono::steady_clock::now();
          ops[i]();
          t[i][r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
    }
    std::vector<std::pair<std::string, double>> out;
    for (size_t i = 0; i < ops.size(); ++i) {
      std::nth_element(t[i].begin(), t[i].begin() + repeats / 2, t[i].end());
      out.emplace_back(names[i], t[i][repeats / 2]);
    }
    return out;
  }
};

// Replay several graphs at once, one OpenMP thread each; the ops inside run single-threaded (each thread's
// own nthreads ICV is set to 1), so every graph stays on one core with its own buffers.
void run_graphs(const std::vector<OpGraph*>& graphs) {
  for (const auto* g : graphs)
    if (!g) throw py::value_error("run_graphs: None in the list");
  py::gil_scoped_release nogil;
  const int n = static_cast<int>(graphs.size());
#pragma omp parallel num_threads(n)
  {
    omp_set_num_threads(1);
    const int t = omp_get_thread_num();
    if (t < n)
      for (const auto& op : graphs[t]->ops) op();
  }
}

std::string shape_name(const char* kind, std::initializer_list<int64_t> dims) {
  std::string s(kind);
  s += ' ';
  for (auto it = dims.begin(); it != dims.end(); ++it) s += (it == dims.begin() ? "" : "x") + std::to_string(*it);
  return s;
}

void submit(const py::object& graph, std::function<void()> op, const std::string& name) {
  if (graph.is_none()) {
    py::gil_scoped_release nogil;
    op();
  } else {
    auto& g = graph.cast<OpGraph&>();
    g.ops.push_back(std::move(op));
    g.names.push_back(name);
  }
}

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
      rf::gn_silu_cl(cptr<uint16_t>(x), batch, pixels, channels, groups, w, b, sc, sh, film_stride,
                     cptr<uint16_t>(residual), act, eps, reinterpret_cast<uint16_t*>(out));
    else
      rf::gn_silu_cl(cptr<float>(x), batch, pixels, channels, groups, w, b, sc, sh, film_stride,
                     cptr<float>(residual), act, eps, reinterpret_cast<float*>(out));
  }, shape_name(act ? "gn_silu" : "gn", {batch, pixels, channels}));
}

void channel_norm_cl(uintptr_t x, uintptr_t out, int64_t rows, int64_t channels, float eps, bool bf16,
                     py::object graph) {
  if (rows < 0 || channels <= 0) throw py::value_error("channel_norm_cl: bad shape");
  if (!x || !out) throw py::value_error("channel_norm_cl: null pointer");
  submit(graph, [=] {
    if (bf16)
      rf::channel_norm_cl(cptr<uint16_t>(x), rows, channels, eps, reinterpret_cast<uint16_t*>(out));
    else
      rf::channel_norm_cl(cptr<float>(x), rows, channels, eps, reinterpret_cast<float*>(out));
  }, shape_name("channel_norm", {rows, channels}));
}

void attention_cl(uintptr_t qkv, uintptr_t out, int64_t batch, int64_t pixels, int64_t heads, int64_t dim,
                  bool linear, bool bf16, py::object graph) {
  if (batch < 0 || pixels <= 0 || heads <= 0 || dim <= 0) throw py::value_error("attention_cl: bad shape");
  if (!qkv || !out) throw py::value_error("attention_cl: null pointer");
  submit(graph, [=] {
    if (bf16) {
      const auto* q = cptr<uint16_t>(qkv);
      auto* o = reinterpret_cast<uint16_t*>(out);
      linear ? rf::linear_attn_cl(q, batch, pixels, heads, dim, o) : rf::softmax_attn_cl(q, batch, pixels, heads, dim, o);
    } else {
      const auto* q = cptr<float>(qkv);
      auto* o = reinterpret_cast<float*>(out);
      linear ? rf::linear_attn_cl(q, batch, pixels, heads, dim, o) : rf::softmax_attn_cl(q, batch, pixels, heads, dim, o);
    }
  }, shape_name(linear ? "linear_attn" : "softmax_attn", {batch, pixels, heads, dim}));
}

void concat_channels_cl(uintptr_t a, uintptr_t b, uintptr_t out, int64_t rows, int64_t bytes_a, int64_t bytes_b,
                        py::object graph) {
  if (rows < 0 || bytes_a <= 0 || bytes_b <= 0) throw py::value_error("concat_channels_cl: bad shape");
  if (!a || !b || !out) throw py::value_error("concat_channels_cl: null pointer");
  submit(graph, [=] { rf::concat_rows(cptr<uint8_t>(a), cptr<uint8_t>(b), reinterpret_cast<uint8_t*>(out), rows, bytes_a, bytes_b); }, shape_name("concat", {rows, bytes_a, bytes_b}));
}

// Direct convolutions (csrc/cpu/conv_cpu.h): bf16 storage needs AVX512-BF16, fp32 AVX-512.
void require_conv_isa(bool bf16, const char* op) {
  if (bf16 ? !rf::conv_bf16_supported() : !rf::conv_f32_supported())
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
      rf::conv2d_cl(cptr<uint16_t>(x), batch, h, w, c, cptr<uint16_t>(wpacked), kh, kw, n, stride, pad, ho, wo,
                    cptr<float>(bias), cptr<uint16_t>(res), reinterpret_cast<uint16_t*>(out), replicate);
    else
      rf::conv2d_cl(cptr<float>(x), batch, h, w, c, cptr<float>(wpacked), kh, kw, n, stride, pad, ho, wo,
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
      rf::conv2d_rows_cl(cptr<uint16_t>(xpad), batch, hp, wp, c, cptr<uint16_t>(wpacked), kh, kw, n, cptr<float>(bias),
                         cptr<uint16_t>(res), reinterpret_cast<uint16_t*>(out));
    else
      rf::conv2d_rows_cl(cptr<float>(xpad), batch, hp, wp, c, cptr<float>(wpacked), kh, kw, n, cptr<float>(bias),
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
      rf::conv_transpose2d_k4s2p1_cl(cptr<uint16_t>(x), batch, h, w, c, cptr<uint16_t>(wpacked), n, cptr<float>(bias),
                                     reinterpret_cast<uint16_t*>(out), replicate);
    else
      rf::conv_transpose2d_k4s2p1_cl(cptr<float>(x), batch, h, w, c, cptr<float>(wpacked), n, cptr<float>(bias),
                                     reinterpret_cast<float*>(out), replicate);
  }, shape_name("conv_t", {batch, h, w, c, n}));
}

// ---- MAGE-Net enhancer ops (retina_fast/enhance.py CPURunner; checked there) ----------------------------

void upsample_bilinear_cl(uintptr_t x, int64_t batch, int64_t hi, int64_t wi, int64_t c, int64_t ho, int64_t wo,
                          uintptr_t res, uintptr_t out, bool bf16) {
  if (batch < 0 || hi <= 0 || wi <= 0 || c <= 0 || ho <= 0 || wo <= 0)
    throw py::value_error("upsample_bilinear_cl: bad shape");
  if (!x || !out) throw py::value_error("upsample_bilinear_cl: null pointer");
  py::gil_scoped_release nogil;
  if (bf16)
    rf::upsample_bilinear_cl(cptr<uint16_t>(x), batch, hi, wi, c, ho, wo, cptr<uint16_t>(res), reinterpret_cast<uint16_t*>(out));
  else
    rf::upsample_bilinear_cl(cptr<float>(x), batch, hi, wi, c, ho, wo, cptr<float>(res), reinterpret_cast<float*>(out));
}

void ca_residual_cl(uintptr_t body, uintptr_t x, int64_t batch, int64_t pixels, int64_t c, uintptr_t w_down,
                    uintptr_t w_up, int64_t r, uintptr_t out, bool bf16) {
  if (batch < 0 || pixels <= 0 || c <= 0 || r <= 0) throw py::value_error("ca_residual_cl: bad shape");
  if (!body || !x || !w_down || !w_up || !out) throw py::value_error("ca_residual_cl: null pointer");
  py::gil_scoped_release nogil;
  const float *wd = cptr<float>(w_down), *wu = cptr<float>(w_up);
  if (bf16)
    rf::ca_residual_cl(cptr<uint16_t>(body), cptr<uint16_t>(x), batch, pixels, c, wd, wu, r, reinterpret_cast<uint16_t*>(out));
  else
    rf::ca_residual_cl(cptr<float>(body), cptr<float>(x), batch, pixels, c, wd, wu, r, reinterpret_cast<float*>(out));
}

py::dict build_info() {
  py::dict d;
  d["build_type"] = RF_BUILD_TYPE;
  d["isa"] = RF_BUILD_ISA;
  d["cuda"] = RF_BUILD_CUDA;
  d["compiler"] = RF_BUILD_COMPILER;
  d["openmp"] = _OPENMP;
  d["omp_max_threads"] = omp_get_max_threads();
  d["cpu_avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  d["cpu_avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  d["cpu_amx_bf16"] = static_cast<bool>(__builtin_cpu_supports("amx-bf16"));
  d["cpu_avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
#if defined(RETINA_FAST_WITH_CUDA)
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "retina_fast compiled core (C++17/OpenMP, optional CUDA); no libtorch dependency";
  m.def("randn_cpu", &randn_cpu, py::arg("keys"), py::arg("offset"), py::arg("out"),
        "Fill out (rows, n) float32 with Philox normals: out[r, j] = normal(keys[r], offset + j).");
  m.def("randint4x", &randint4x, py::arg("counters"), py::arg("keys"),
        "Raw Philox4x32-10: counters (n, 4) uint32, keys (n, 2) uint32 -> (n, 4) uint32.");
  m.def("derive_keys", &derive_keys, py::arg("seed"), py::arg("images"), py::arg("step"), py::arg("stream"),
        "Per-image, per-step 64-bit keys (see retina_fast.noise.derive_keys).");
  m.def("nearest_code", &nearest_code, py::arg("x"), py::arg("codebook"), py::arg("code_sqnorm"),
        py::arg("idx"), py::arg("dist"),
        "Nearest codebook row by L2 for each row of x (n, d); writes idx (n,) int64 and squared dist (n,).");
  m.def("sampler_step", &sampler_step, py::arg("x"), py::arg("eps"), py::arg("x0_prev"), py::arg("keys"),
        py::arg("coef"), py::arg("clip"), py::arg("out"), py::arg("x0_out"),
        "Fused generic sampler update with in-loop Philox noise; arrays are (batch, n) float32.");
  m.def("build_info", &build_info);
  m.def("gn_silu_cl", &gn_silu_cl, py::arg("x"), py::arg("out"), py::arg("residual"), py::arg("batch"),
        py::arg("pixels"), py::arg("channels"), py::arg("groups"), py::arg("weight"), py::arg("bias"),
        py::arg("scale"), py::arg("shift"), py::arg("film_stride"), py::arg("act"), py::arg("eps"), py::arg("bf16"), py::arg("graph") = py::none(),
        "Channels-last GroupNorm -> x (1 + scale) + shift -> SiLU [+ residual] on data pointers (B, P, C).");
  m.def("conv_bf16_supported", &rf::conv_bf16_supported, "Whether this CPU can run the bf16 direct convolutions.");
  m.def("conv_f32_supported", &rf::conv_f32_supported, "Whether this CPU can run the fp32 direct convolutions.");
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
  m.def("concat_channels_cl", &concat_channels_cl, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("rows"),
        py::arg("bytes_a"), py::arg("bytes_b"), py::arg("graph") = py::none(),
        "out row r = a row r (bytes_a) then b row r (bytes_b): channel concat of channels-last tensors.");
  m.def("upsample_bilinear_cl", &upsample_bilinear_cl, py::arg("x"), py::arg("batch"), py::arg("hi"), py::arg("wi"),
        py::arg("c"), py::arg("ho"), py::arg("wo"), py::arg("res"), py::arg("out"), py::arg("bf16"),
        "Channels-last bilinear resize (align_corners=False) [+ res] on data pointers; see csrc/cpu/enhance_ops_cpu.h.");
  m.def("ca_residual_cl", &ca_residual_cl, py::arg("body"), py::arg("x"), py::arg("batch"), py::arg("pixels"),
        py::arg("c"), py::arg("w_down"), py::arg("w_up"), py::arg("r"), py::arg("out"), py::arg("bf16"),
        "Channel attention of body (B, P, C) times body plus x, channels-last, on data pointers.");
  m.def("enhance_ops_scalar_only", &rf::enhance_ops_scalar_only, py::arg("on"),
        "Tests: make upsample_bilinear_cl / ca_residual_cl use their scalar fallback (as without AVX-512).");
  py::class_<OpGraph>(m, "OpGraph", "A captured sequence of fused CPU ops, replayed by run() (see module.cpp).")
      .def(py::init<>())
      .def("run", &OpGraph::run)
      .def("profile", &OpGraph::profile, py::arg("repeats") = 20,
           "Replay `repeats` times timing each op: [(name, median seconds)] in op order.")
      .def("__len__", [](const OpGraph& g) { return g.ops.size(); });
  m.def("run_graphs", &run_graphs, py::arg("graphs"),
        "Replay the graphs concurrently, one OpenMP thread each, their ops single-threaded.");
  m.def("channel_norm_cl", &channel_norm_cl, py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("channels"),
        py::arg("eps"), py::arg("bf16"), py::arg("graph") = py::none(), "LayerNorm over C of each row of x (rows, C), no affine; data pointers.");
  m.def("attention_cl", &attention_cl, py::arg("qkv"), py::arg("out"), py::arg("batch"), py::arg("pixels"),
        py::arg("heads"), py::arg("dim"), py::arg("linear"), py::arg("bf16"), py::arg("graph") = py::none(),
        "Linear or softmax attention on a channels-last to_qkv output (B, P, 3 heads dim); data pointers.");
#if defined(RETINA_FAST_WITH_CUDA)
  m.def("randn_cuda", [](uintptr_t keys, int64_t rows, int64_t n, uint64_t offset, uintptr_t out,
                         uintptr_t stream) {
    if (rows < 0 || n < 0) throw py::value_error("negative size");
    const char* err = rf::philox_randn_cuda(reinterpret_cast<const uint64_t*>(keys), rows, n, offset,
                                            reinterpret_cast<float*>(out), stream);
    if (err[0] != '\0') throw std::runtime_error(std::string("randn_cuda: ") + err);
  });
  m.def("cuda_device_count", []() {
    int count = 0;
    const char* err = rf::cuda_device_summary(&count);
    return py::make_tuple(count, std::string(err));
  });
#endif
}
