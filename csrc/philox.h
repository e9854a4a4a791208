// Philox4x32-10 and the uint -> float -> normal conversion of triton.language.randn.
//
// Counter-based: the output for (key, counter) depends on nothing else, so every backend (C++, CUDA,
// Triton, the pure-torch reference) produces the same integers bit for bit.
//
//   key     = (seed & 0xffffffff, seed >> 32)                    (64-bit seed, as Triton)
//   counter = (offset & 0xffffffff, offset >> 32, 0, 0)          (64-bit element offset)
//   round:  c0' = mulhi(B, c2) ^ c1 ^ k0,  c1' = B * c2,
//           c2' = mulhi(A, c0) ^ c3 ^ k1,  c3' = A * c0,  k += (W0, W1)
//   normal: u_i = int32(x_i) -> (x < 0 ? ~x : x) * 4.6566127342e-10f   for x_0, x_1
//           n   = sqrt(-2 log(max(u_0, 1e-7))) * cos(6.2831855f * u_1)
// For offsets below 2^32 this is exactly tl.randn(seed, offset) with 32-bit offsets.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RF_HD __host__ __device__ __forceinline__
#else
#define RF_HD inline
#endif

namespace rf {

constexpr uint32_t kPhiloxA = 0xD2511F53u;
constexpr uint32_t kPhiloxB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kUintToUniform = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

struct U32x4 {
  uint32_t v[4];
};

RF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// One 32x32 -> 64-bit product per multiplier gives both the high word and the new low word.
#define RF_PHILOX_ROUND                                                   \
  {                                                                       \
    const uint64_t pb = static_cast<uint64_t>(kPhiloxB) * c2;             \
    const uint64_t pa = static_cast<uint64_t>(kPhiloxA) * c0;             \
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;                       \
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;                       \
    c1 = static_cast<uint32_t>(pb);                                       \
    c3 = static_cast<uint32_t>(pa);                                       \
    k0 += kPhiloxW0;                                                      \
    k1 += kPhiloxW1;                                                      \
  }

// Ten rounds written out (no loop), so that compilers vectorise callers' element loops.
RF_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  RF_PHILOX_ROUND RF_PHILOX_ROUND RF_PHILOX_ROUND RF_PHILOX_ROUND RF_PHILOX_ROUND
  RF_PHILOX_ROUND RF_PHILOX_ROUND RF_PHILOX_ROUND RF_PHILOX_ROUND RF_PHILOX_ROUND
  return U32x4{{c0, c1, c2, c3}};
}
#undef RF_PHILOX_ROUND

RF_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;  // == -s - 1 without overflow
  return static_cast<float>(s) * kUintToUniform;
}

// Per-image, per-step key: Philox of the run seed with counter (image, step, stream, tag).
// See retina_fast/noise.py for the contract; every backend derives keys with this one function.
constexpr uint32_t kKeyTag = 0x52465354u;  // "RFST"
RF_HD uint64_t derive_key(uint64_t seed, uint32_t image, uint32_t step, uint32_t stream) {
  const U32x4 r = philox4x32_10(image, step, stream, kKeyTag, static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32));
  return (static_cast<uint64_t>(r.v[1]) << 32) | r.v[0];
}

}  // namespace rf
