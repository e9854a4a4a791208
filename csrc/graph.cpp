// OpGraph (record / replay of channels-last CPU ops), run_graphs, and the build / CPU feature report.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "bindings.h"

namespace rf_bind {

void OpGraph::run() {
  py::gil_scoped_release nogil;
  for (const auto& op : ops) op();
}

// Replay `repeats` times timing every op; returns [(name, median seconds)] in op order. The per-op timer
// (steady_clock, ~20 ns) is the only overhead, so the sum is close to one run().
std::vector<std::pair<std::string, double>> OpGraph::profile(int repeats) {
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

namespace {

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

void bind_graph(py::module_& m) {
  m.def("build_info", &build_info);
  py::class_<OpGraph>(m, "OpGraph", "A captured sequence of fused CPU ops, replayed by run() (see graph.cpp).")
      .def(py::init<>())
      .def("run", &OpGraph::run)
      .def("profile", &OpGraph::profile, py::arg("repeats") = 20,
           "Replay `repeats` times timing each op: [(name, median seconds)] in op order.")
      .def("__len__", [](const OpGraph& g) { return g.ops.size(); });
  m.def("run_graphs", &run_graphs, py::arg("graphs"),
        "Replay the graphs concurrently, one OpenMP thread each, their ops single-threaded.");
}

}  // namespace rf_bind
