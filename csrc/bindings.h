#pragma once
// Shared by the per-op binding files (csrc/<op>.cpp): argument checks for NumPy buffers, raw data pointers
// from the Python wrappers (retina_fast/ops/<op>.py), and the OpGraph that records channels-last CPU ops.
//
// CPU tensors arrive as NumPy arrays (torch.Tensor.numpy() shares memory) or, on the hot paths called ~100
// times per U-Net step, as data pointers the Python wrapper has checked (device, dtype, channels-last
// contiguity, shapes); here only the scalar arguments are checked. CUDA tensors arrive as device pointers
// plus the caller's stream.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

namespace rf_bind {

namespace py = pybind11;

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

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }

template <typename T>
T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// A captured sequence of CPU ops with fixed pointers and shapes, replayed by run() in one call without the
// GIL -- the CPU counterpart of a CUDA graph: the caller keeps the buffers alive and refills inputs in place.
struct OpGraph {
  std::vector<std::function<void()>> ops;
  std::vector<std::string> names;  // "kind shape" per op, for profile()
  void run();
  std::vector<std::pair<std::string, double>> profile(int repeats);
};

// Run `op` now (without the GIL) when `graph` is None, else append it to that OpGraph.
void submit(const py::object& graph, std::function<void()> op, const std::string& name);
std::string shape_name(const char* kind, std::initializer_list<int64_t> dims);

// One per binding file: adds its functions to the module.
void bind_graph(py::module_& m);
void bind_philox(py::module_& m);
void bind_nearest_code(py::module_& m);
void bind_sampler_step(py::module_& m);
void bind_group_norm_silu(py::module_& m);
void bind_channel_norm(py::module_& m);
void bind_attention(py::module_& m);
void bind_conv(py::module_& m);
void bind_layout(py::module_& m);
void bind_channel_attention(py::module_& m);
void bind_resize(py::module_& m);

}  // namespace rf_bind
