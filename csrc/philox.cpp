// Philox4x32-10 normals and keys (csrc/philox.h): NumPy buffers in, checked here.
#include "cpu/philox_cpu.h"
#if defined(RETINA_FAST_WITH_CUDA)
#include "cuda/philox_cuda.h"
#endif
#include <stdexcept>

#include "bindings.h"

namespace rf_bind {
namespace {

void randn_cpu(py::array keys, uint64_t offset, py::array out) {
  require<uint64_t>(keys, "keys", 1);
  require<float>(out, "out", 2);
  if (out.shape(0) != keys.shape(0)) throw py::value_error("out.shape[0] must equal len(keys)");
  if (!out.writeable()) throw py::value_error("out is read-only");
  const auto* k = static_cast<const uint64_t*>(keys.data());
  auto* o = static_cast<float*>(out.mutable_data());
  const int64_t rows = out.shape(0), n = out.shape(1);
  py::gil_scoped_release nogil;
  ::rf::philox_randn_cpu(k, rows, n, offset, o);
}

py::array randint4x(py::array counters, py::array keys) {
  require<uint32_t>(counters, "counters", 2);
  require<uint32_t>(keys, "keys", 2);
  if (counters.shape(1) != 4 || keys.shape(1) != 2 || counters.shape(0) != keys.shape(0))
    throw py::value_error("counters must be (n, 4) and keys (n, 2)");
  const int64_t n = counters.shape(0);
  CArray<uint32_t> out({n, static_cast<int64_t>(4)});
  ::rf::philox_randint4x_cpu(static_cast<const uint32_t*>(counters.data()),
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
  ::rf::derive_keys_cpu(seed, im, n, step, stream, out.mutable_data());
  return out;
}

}  // namespace

void bind_philox(py::module_& m) {
  m.def("randn_cpu", &randn_cpu, py::arg("keys"), py::arg("offset"), py::arg("out"),
        "Fill out (rows, n) float32 with Philox normals: out[r, j] = normal(keys[r], offset + j).");
  m.def("randint4x", &randint4x, py::arg("counters"), py::arg("keys"),
        "Raw Philox4x32-10: counters (n, 4) uint32, keys (n, 2) uint32 -> (n, 4) uint32.");
  m.def("derive_keys", &derive_keys, py::arg("seed"), py::arg("images"), py::arg("step"), py::arg("stream"),
        "Per-image, per-step 64-bit keys (see retina_fast.noise.derive_keys).");
#if defined(RETINA_FAST_WITH_CUDA)
  m.def("randn_cuda", [](uintptr_t keys, int64_t rows, int64_t n, uint64_t offset, uintptr_t out,
                         uintptr_t stream) {
    if (rows < 0 || n < 0) throw py::value_error("negative size");
    const char* err = ::rf::philox_randn_cuda(reinterpret_cast<const uint64_t*>(keys), rows, n, offset,
                                            reinterpret_cast<float*>(out), stream);
    if (err[0] != '\0') throw std::runtime_error(std::string("randn_cuda: ") + err);
  });
  m.def("cuda_device_count", []() {
    int count = 0;
    const char* err = ::rf::cuda_device_summary(&count);
    return py::make_tuple(count, std::string(err));
  });
#endif
}

}  // namespace rf_bind
