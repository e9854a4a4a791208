#pragma once
// Scalar load/store of float32 or bf16 bits (uint16_t) as float; bf16 stores round to nearest even and
// keep NaN a NaN. Shared by the channels-last CPU ops; inner loops built on these vectorise.
#include <cstdint>
#include <cstring>

namespace rf {

inline __attribute__((always_inline)) float ld(float v) { return v; }
inline __attribute__((always_inline)) float ld(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __attribute__((always_inline)) void st(float* d, float v) { *d = v; }
inline __attribute__((always_inline)) void st(uint16_t* d, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  *d = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

}  // namespace rf
