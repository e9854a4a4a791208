// retina_fast._C: one binding file per op (csrc/<op>.cpp validates and dispatches, csrc/cpu and csrc/cuda hold
// the kernels); this file only assembles the module.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "retina_fast compiled core (C++17/OpenMP, optional CUDA); no libtorch dependency";
  rf_bind::bind_graph(m);
  rf_bind::bind_philox(m);
  rf_bind::bind_nearest_code(m);
  rf_bind::bind_sampler_step(m);
  rf_bind::bind_group_norm_silu(m);
  rf_bind::bind_channel_norm(m);
  rf_bind::bind_attention(m);
  rf_bind::bind_conv(m);
  rf_bind::bind_layout(m);
  rf_bind::bind_channel_attention(m);
  rf_bind::bind_resize(m);
}
