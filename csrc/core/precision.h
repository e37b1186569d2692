// 16-bit storage types and their conversions, usable on the CPU and in CUDA.
//
// float16 and bfloat16 are stored as their bit patterns; all math runs in float.
// Conversions are written with integer operations and selects, with no branches
// and no library calls, so that GCC vectorizes them and the GPU computes the very
// same bits. Float to 16-bit rounds to nearest even, or stochastically: the
// random bits come from a counter-based hash of (seed, step, tensor, element), so
// a given seed and step give the same result on every thread count and device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace fo {

struct bf16 {
  std::uint16_t bits;
};
struct f16 {
  std::uint16_t bits;
};

FO_HD std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FO_HD float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// --- bfloat16: the upper half of a float ---------------------------------------------

FO_HD float to_float(bf16 h) { return bits_float(std::uint32_t(h.bits) << 16); }

FO_HD std::uint16_t bf16_nearest(float f) {
  const std::uint32_t x = float_bits(f);
  const bool nan = (x & 0x7fffffffu) > 0x7f800000u;
  const std::uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return std::uint16_t(nan ? ((x >> 16) | 0x40u) : rounded);  // keep NaN a (quiet) NaN
}

// Stochastic: add 16 random bits below the kept half, then truncate. The result is
// the upper neighbour with probability (distance from the lower one) / spacing.
FO_HD std::uint16_t bf16_stochastic(float f, std::uint32_t rnd) {
  const std::uint32_t x = float_bits(f);
  const bool special = (x & 0x7f800000u) == 0x7f800000u;  // inf and NaN stay as they are
  const std::uint32_t rounded = (x + (rnd & 0xffffu)) >> 16;
  return std::uint16_t(special ? ((x >> 16) | ((x & 0xffffu) ? 0x40u : 0u)) : rounded);
}

// --- float16 (IEEE binary16) ----------------------------------------------------------

// The float value of the float16 bit pattern in the low 16 bits of h.
FO_HD float f16_bits_float(std::uint32_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  const std::uint32_t normal = ((exp + 112u) << 23) | (man << 13);
  // inf, and NaN made quiet with its payload kept: what the F16C conversion
  // instruction gives, so that the builds using it agree bit for bit
  const std::uint32_t special = 0x7f800000u | (man << 13) | (man != 0 ? 0x400000u : 0u);
  const float sub = float(int(man)) * 5.9604644775390625e-08f;  // man * 2^-24, exact
  const std::uint32_t mag = exp == 0 ? float_bits(sub) : exp == 31 ? special : normal;
  return bits_float(sign | mag);
}

FO_HD float to_float(f16 h) { return f16_bits_float(h.bits); }

FO_HD std::uint16_t f16_nearest(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  // normal range: rebias the exponent and round the 13 dropped bits to nearest even
  const std::uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // below 2^-14: adding 0.5 makes the float unit round the value at 2^-24 steps
  const std::uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  // NaN: quiet, with the top of its payload (as the F16C instruction rounds)
  const std::uint32_t mag = a > 0x7f800000u   ? 0x7e00u | ((a >> 13) & 0x3ffu)
                            : a >= 0x477ff000u ? 0x7c00u  // rounds to infinity
                            : a < 0x38800000u  ? sub
                                               : normal;
  return std::uint16_t(sign | mag);
}

// Stochastic: round to nearest, then move to the other neighbour of f with
// probability |f - nearest| / |other - nearest|, which makes the rounding unbiased.
FO_HD std::uint16_t f16_stochastic(float f, std::uint32_t rnd) {
  const std::uint32_t r = f16_nearest(f);
  const float fr = f16_bits_float(r);
  const float err = f - fr;
  // the other neighbour is one step further from zero when |f| > |fr|, else nearer
  const std::uint32_t other = ((fabsf(f) > fabsf(fr)) ? r + 1u : r - 1u) & 0xffffu;
  const float gap = f16_bits_float(other) - fr;
  const float prob = err / gap;                      // in [0, 1/2]
  const float u = float(rnd >> 8) * 5.9604645e-08f;  // 24 random bits -> [0, 1)
  // u < prob is false where f is exact (prob 0) and where f is not finite or rounds to
  // infinity (prob NaN): r stays
  return std::uint16_t(u < prob ? other : r);
}

// --- random bits: a counter-based hash (splitmix64's finalizer) ------------------------

FO_HD std::uint32_t random_bits(std::uint64_t key, std::uint64_t index) {
  std::uint64_t z = key + index * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return std::uint32_t((z ^ (z >> 31)) >> 32);
}

// The random stream of one step: a hash of the seed and the step count, so each step
// rounds with fresh bits and a given (seed, step) always with the same ones. The host
// computes it for the counts it keeps (fusedopt._precision.rounding_key calls this),
// the CUDA kernels for a count kept on the device.
FO_HD std::uint64_t step_key(std::uint64_t seed, std::uint64_t step) {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + step * 0xc2b2ae3d27d4eb4full;
  z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
  return z ^ (z >> 29);
}

// The random stream of tensor j of a call: element i of it draws random_bits(key, i).
FO_HD std::uint64_t tensor_key(std::uint64_t call_key, std::int64_t j) {
  return call_key ^ (std::uint64_t(j + 1) * 0xd1b54a32d192ed03ull);
}

// --- storage <-> math --------------------------------------------------------------

template <class M>
FO_HD M load(float v) { return M(v); }
template <class M>
FO_HD M load(double v) { return M(v); }
template <class M>
FO_HD M load(bf16 v) { return M(to_float(v)); }
template <class M>
FO_HD M load(f16 v) { return M(to_float(v)); }

// Store with round to nearest even (SR false) or stochastic rounding (SR true, with
// the element's random bits). The mode is a compile-time choice so that neither
// conversion sits behind a run-time branch in a vectorized loop.
template <class T>
struct Store {
  template <bool SR, class M>
  FO_HD static T apply(M v, std::uint32_t) { return T(v); }
};
template <>
struct Store<bf16> {
  template <bool SR, class M>
  FO_HD static bf16 apply(M v, std::uint32_t rnd) {
    if constexpr (SR) return bf16{bf16_stochastic(float(v), rnd)};
    else return bf16{bf16_nearest(float(v))};
  }
};
template <>
struct Store<f16> {
  template <bool SR, class M>
  FO_HD static f16 apply(M v, std::uint32_t rnd) {
    if constexpr (SR) return f16{f16_stochastic(float(v), rnd)};
    else return f16{f16_nearest(float(v))};
  }
};

template <class T>
constexpr bool is_16bit() {
  return sizeof(T) == 2;
}

}  // namespace fo
