// Blockwise 8-bit optimizer state: the code tables and the block scheme, shared by the
// CPU driver and the CUDA functor.
//
// A quantized state buffer holds one 8-bit code per element and one float32 scale per
// block of kQuantBlock elements; blocks start at the first element of each tensor (a
// block never straddles two tensors) and the last block of a tensor may be shorter.
// An element's value is code_table[code] * scale (Dettmers et al. 2022, "8-bit
// Optimizers via Block-wise Quantization"). The scale of a block is the largest
// magnitude among its values (its absmax), so the largest element maps to a code of
// magnitude 1.
//
// The code tables are bitsandbytes' dynamic quantization maps (create_dynamic_map):
// a sign (signed map), then decades 10^-6 .. 10^0 with 1, 2, 4, ..., 64 linearly spaced
// values each (signed; unsigned: 2, 4, ..., 128), plus 0 and 1. States whose values
// are never negative (the specs' State.positive) use the unsigned map, all others the
// signed one; both are stored as uint8 codes, as bitsandbytes stores them (so its state
// dicts and these decode to the same values).
//
// Encoding a value y = x / scale picks its nearest code by a formula rather than a
// search: the octave of |y| (its float exponent) gives the slot (zero, one of the seven
// decades, or the top code 1) up to one threshold per octave, and inside a decade the
// codes are evenly spaced, so the code is an affine function of |y|, truncated. The
// thresholds are the midpoints between neighbouring codes, so the result is the nearest
// code except within a few float32 roundings of a midpoint, where it may be the other
// neighbour. The same float operations run on every instruction set and on the GPU, so
// the codes are the same bits everywhere.
//
// Special values: a block whose values are all zero gets scale 0 and the zero code
// (-0 reads back as +0). A block holding an inf or NaN gets that value's magnitude as
// its scale (inf, or a NaN) and the zero code everywhere: every element of the block
// then reads as NaN, so a non-finite state poisons its whole block (as it would poison
// the parameter). Negative values of an unsigned state are stored as 0.
#pragma once

#include <cstdint>
#include <limits>

#include "precision.h"

namespace fo {

constexpr int kQuantBlock = 256;

// Storage tag of a blockwise 8-bit state element (layouts.h): a code.
struct q8 {
  std::uint8_t bits;
};

constexpr std::int64_t quant_blocks(std::int64_t n) { return (n + kQuantBlock - 1) / kQuantBlock; }

// bitsandbytes' create_dynamic_map(signed=True) and create_dynamic_map(signed=False),
// float32, sorted.
constexpr float kDynamicSignedCodes[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f,
    -0x1.df999ap-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f,
    -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f,
    -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f,
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f,
    -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f,
    -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f,
    -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f,
    -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f, -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f,
    -0x1.93d70ap-4f, -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f,
    -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f,
    -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f,
    -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f,
    -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f,
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f,
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f,
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f,
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0p+0f,
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f,
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f,
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f,
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f,
    0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f,
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f,
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f,
    0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f,
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f,
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f,
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f,
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f,
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f,
    0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f,
};

constexpr float kDynamicUnsignedCodes[256] = {
    0x0p+0f, 0x1.5cf754p-22f, 0x1.a0133p-21f, 0x1.1d367p-19f,
    0x1.2599ecp-18f, 0x1.bc98a2p-18f, 0x1.29cbaap-17f, 0x1.0624dcp-16f,
    0x1.c2e34p-16f, 0x1.3fd0dp-15f, 0x1.9e3p-15f, 0x1.fc8f34p-15f,
    0x1.2d7732p-14f, 0x1.5ca6c8p-14f, 0x1.8bd662p-14f, 0x1.0cb296p-13f,
    0x1.82a994p-13f, 0x1.f8a092p-13f, 0x1.374bc8p-12f, 0x1.724744p-12f,
    0x1.ad42c6p-12f, 0x1.e83e44p-12f, 0x1.119ce2p-11f, 0x1.2f1aap-11f,
    0x1.4c986p-11f, 0x1.6a162p-11f, 0x1.8793dep-11f, 0x1.a511ap-11f,
    0x1.c28f5ep-11f, 0x1.e00d1cp-11f, 0x1.fd8adcp-11f, 0x1.2b020cp-10f,
    0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041894p-9f, 0x1.28f5c2p-9f,
    0x1.4dd2fp-9f, 0x1.72b02p-9f, 0x1.978d4ep-9f, 0x1.bc6a8p-9f,
    0x1.e147aep-9f, 0x1.03126ep-8f, 0x1.158104p-8f, 0x1.27ef9ep-8f,
    0x1.3a5e34p-8f, 0x1.4cccccp-8f, 0x1.5f3b64p-8f, 0x1.71a9fap-8f,
    0x1.841894p-8f, 0x1.96872ap-8f, 0x1.a8f5c2p-8f, 0x1.bb645cp-8f,
    0x1.cdd2fp-8f, 0x1.e0418ap-8f, 0x1.f2b01ep-8f, 0x1.028f5cp-7f,
    0x1.0bc6a8p-7f, 0x1.14fdf2p-7f, 0x1.1e354p-7f, 0x1.276c8ap-7f,
    0x1.30a3d6p-7f, 0x1.39db24p-7f, 0x1.43126ep-7f, 0x1.5eb854p-7f,
    0x1.8ccccep-7f, 0x1.bae146p-7f, 0x1.e8f5c4p-7f, 0x1.0b851ep-6f,
    0x1.228f5ep-6f, 0x1.39999ap-6f, 0x1.50a3d6p-6f, 0x1.67ae16p-6f,
    0x1.7eb852p-6f, 0x1.95c28ep-6f, 0x1.accccep-6f, 0x1.c3d70ep-6f,
    0x1.dae146p-6f, 0x1.f1eb86p-6f, 0x1.047aep-5f, 0x1.1p-5f,
    0x1.1b851ep-5f, 0x1.270a3ep-5f, 0x1.328f5ep-5f, 0x1.3e147ap-5f,
    0x1.49999ap-5f, 0x1.551eb8p-5f, 0x1.60a3d6p-5f, 0x1.6c28f6p-5f,
    0x1.77ae14p-5f, 0x1.833334p-5f, 0x1.8eb85p-5f, 0x1.9a3d7p-5f,
    0x1.a5c28ep-5f, 0x1.b147aep-5f, 0x1.bccccep-5f, 0x1.c851eep-5f,
    0x1.d3d70ep-5f, 0x1.df5c2ap-5f, 0x1.eae146p-5f, 0x1.f66666p-5f,
    0x1.00f5c4p-4f, 0x1.06b854p-4f, 0x1.0c7ae2p-4f, 0x1.123d7p-4f,
    0x1.18p-4f, 0x1.1dc29p-4f, 0x1.23852p-4f, 0x1.2947aep-4f,
    0x1.2f0a3ep-4f, 0x1.34cccep-4f, 0x1.3a8f5ep-4f, 0x1.4051ecp-4f,
    0x1.46147cp-4f, 0x1.4bd70ap-4f, 0x1.51999ap-4f, 0x1.575c2ap-4f,
    0x1.5d1eb8p-4f, 0x1.62e148p-4f, 0x1.68a3d6p-4f, 0x1.6e6666p-4f,
    0x1.7428f6p-4f, 0x1.79eb86p-4f, 0x1.7fae16p-4f, 0x1.8570a4p-4f,
    0x1.8b3334p-4f, 0x1.90f5c4p-4f, 0x1.96b852p-4f, 0x1.a8p-4f,
    0x1.c4ccccp-4f, 0x1.e1999ap-4f, 0x1.fe6666p-4f, 0x1.0d9998p-3f,
    0x1.1cp-3f, 0x1.2a6668p-3f, 0x1.38ccccp-3f, 0x1.473334p-3f,
    0x1.559998p-3f, 0x1.64p-3f, 0x1.726668p-3f, 0x1.80ccccp-3f,
    0x1.8f3334p-3f, 0x1.9d9998p-3f, 0x1.acp-3f, 0x1.ba6668p-3f,
    0x1.c8ccccp-3f, 0x1.d73334p-3f, 0x1.e59998p-3f, 0x1.f4p-3f,
    0x1.013332p-2f, 0x1.086666p-2f, 0x1.0f999ap-2f, 0x1.16ccccp-2f,
    0x1.1ep-2f, 0x1.253334p-2f, 0x1.2c6666p-2f, 0x1.339998p-2f,
    0x1.3accccp-2f, 0x1.42p-2f, 0x1.493334p-2f, 0x1.506666p-2f,
    0x1.579998p-2f, 0x1.5eccccp-2f, 0x1.66p-2f, 0x1.6d3334p-2f,
    0x1.746666p-2f, 0x1.7b9998p-2f, 0x1.82ccccp-2f, 0x1.8ap-2f,
    0x1.913334p-2f, 0x1.986666p-2f, 0x1.9f9998p-2f, 0x1.a6ccccp-2f,
    0x1.aep-2f, 0x1.b53334p-2f, 0x1.bc6666p-2f, 0x1.c39998p-2f,
    0x1.caccccp-2f, 0x1.d2p-2f, 0x1.d93334p-2f, 0x1.e06666p-2f,
    0x1.e79998p-2f, 0x1.eeccccp-2f, 0x1.f6p-2f, 0x1.fd3332p-2f,
    0x1.023334p-1f, 0x1.05ccccp-1f, 0x1.096666p-1f, 0x1.0dp-1f,
    0x1.109998p-1f, 0x1.143334p-1f, 0x1.17ccccp-1f, 0x1.1b6668p-1f,
    0x1.1fp-1f, 0x1.22999ap-1f, 0x1.263334p-1f, 0x1.29ccccp-1f,
    0x1.2d6668p-1f, 0x1.31p-1f, 0x1.34999ap-1f, 0x1.383334p-1f,
    0x1.3bccccp-1f, 0x1.3f6668p-1f, 0x1.43p-1f, 0x1.46999ap-1f,
    0x1.4a3334p-1f, 0x1.4dccccp-1f, 0x1.516668p-1f, 0x1.55p-1f,
    0x1.58999ap-1f, 0x1.5c3334p-1f, 0x1.5fccccp-1f, 0x1.636668p-1f,
    0x1.67p-1f, 0x1.6a999ap-1f, 0x1.6e3334p-1f, 0x1.71ccccp-1f,
    0x1.756668p-1f, 0x1.79p-1f, 0x1.7c999ap-1f, 0x1.803334p-1f,
    0x1.83ccccp-1f, 0x1.876668p-1f, 0x1.8bp-1f, 0x1.8e9998p-1f,
    0x1.923334p-1f, 0x1.95ccccp-1f, 0x1.996668p-1f, 0x1.9dp-1f,
    0x1.a09998p-1f, 0x1.a43334p-1f, 0x1.a7ccccp-1f, 0x1.ab6668p-1f,
    0x1.afp-1f, 0x1.b29998p-1f, 0x1.b63334p-1f, 0x1.b9ccccp-1f,
    0x1.bd6668p-1f, 0x1.c1p-1f, 0x1.c49998p-1f, 0x1.c83334p-1f,
    0x1.cbccccp-1f, 0x1.cf6668p-1f, 0x1.d3p-1f, 0x1.d69998p-1f,
    0x1.da3334p-1f, 0x1.ddccccp-1f, 0x1.e16668p-1f, 0x1.e5p-1f,
    0x1.e89998p-1f, 0x1.ec3334p-1f, 0x1.efccccp-1f, 0x1.f36668p-1f,
    0x1.f7p-1f, 0x1.fa9998p-1f, 0x1.fe3334p-1f, 0x1p+0f,
};

// One code table and what encoding into it needs. Slots: 0 the zero code, 1 + i the
// decade i (values 10^(i-6) (0.1 + 0.9 (k + 1/2) / n_i), k < n_i), 8 the top code 1.
// A value a = |y| of slot s maps to code min(a * mul[s] - sub[s], cap[s]), truncated;
// thr[s] is the midpoint between slot s and slot s + 1 (infinite for the last), and
// first[o] the slot of the smallest values of octave o = [2^(o-31), 2^(o-30)).
struct QuantMap {
  float code[256];
  float thr[16];
  float mul[16];
  float sub[16];
  float cap[16];
  std::int32_t first[32];
};

// The smallest magnitude the encoder looks at: smaller values share the lowest octave,
// far below the first nonzero code, and encode as zero.
constexpr float kQuantFloor = 4.656612873077392578125e-10f;  // 2^-31

namespace quant_detail {

constexpr double pow2(int k) {
  double r = 1.0;
  for (; k > 0; --k) r *= 2.0;
  for (; k < 0; ++k) r /= 2.0;
  return r;
}

constexpr double pow10(int k) {  // k <= 0: 1 / 10^-k
  double r = 1.0;
  for (int i = 0; i < -k; ++i) r *= 10.0;
  return k < 0 ? 1.0 / r : r;
}

constexpr QuantMap make_map(bool is_signed) {
  QuantMap q{};
  for (int c = 0; c < 256; ++c) q.code[c] = is_signed ? kDynamicSignedCodes[c] : kDynamicUnsignedCodes[c];
  // codes are counted from the zero code: the signed map's are 127 +- r
  const double off = is_signed ? 127.0 : 0.0;
  const double top = is_signed ? 128.0 : 255.0;  // the top code 1, counted the same way
  const float inf = std::numeric_limits<float>::infinity();
  for (int s = 0; s < 16; ++s) {
    q.mul[s] = 0.0f;
    q.sub[s] = float(-top - off);
    q.cap[s] = float(top + off);
    q.thr[s] = inf;
  }
  q.sub[0] = float(-off);  // zero: a * 0 - (-off)
  q.cap[0] = float(off);
  q.thr[0] = float(0.5 * double(q.code[is_signed ? 128 : 1]));
  for (int i = 0; i < 7; ++i) {
    const double n = is_signed ? pow2(i) : pow2(i + 1);  // codes of decade i
    const double base = is_signed ? n : n - 1.0;         // its first code
    const double dec = pow10(i - 6);
    q.mul[1 + i] = float(n / (0.9 * dec));
    q.sub[1 + i] = float(n / 9.0 - base - off);
    q.cap[1 + i] = float(base + n - 1.0 + off);
    // the midpoint between the last code of decade i and the first of decade i + 1
    if (i < 6) q.thr[1 + i] = float(dec * (1.0 + 0.9 / n));
  }
  q.thr[7] = float(0.5 * (double(q.code[254]) + 1.0));  // between the last decade and 1
  for (int o = 0; o < 32; ++o) {
    const double low = pow2(o - 31);
    int s = 0;
    while (s < 8 && double(q.thr[s]) <= low) ++s;
    q.first[o] = s;
  }
  return q;
}

// Every octave holds at most one threshold: the next one lies above the octave.
constexpr bool one_threshold_per_octave(const QuantMap& q) {
  for (int o = 0; o < 32; ++o)
    if (q.first[o] < 8 && double(q.thr[q.first[o] + 1]) < pow2(o - 30)) return false;
  return true;
}

}  // namespace quant_detail

constexpr QuantMap kQuantSigned = quant_detail::make_map(true);
constexpr QuantMap kQuantUnsigned = quant_detail::make_map(false);
static_assert(quant_detail::one_threshold_per_octave(kQuantSigned) &&
              quant_detail::one_threshold_per_octave(kQuantUnsigned),
              "the encoder's octave table needs at most one threshold per octave");

// The code of y = x / scale (|y| <= 1 up to rounding; never NaN). `q` holds the map's
// tables (on the GPU, a copy in shared memory).
template <bool Signed>
FO_HD std::uint8_t quant_encode(float y, const QuantMap& q) {
  float a = Signed ? fabsf(y) : y;
  a = a > kQuantFloor ? a : kQuantFloor;
  const int octave = int(float_bits(a) >> 23) - 96;  // 0 .. 31 for a in [2^-31, 2)
  int s = q.first[octave];
  s += a >= q.thr[s] ? 1 : 0;
  float t = a * q.mul[s] - q.sub[s];
  t = t < q.cap[s] ? t : q.cap[s];
  int code = int(t);
  if (Signed) {
    code = (float_bits(y) >> 31) != 0u ? 254 - code : code;
    code = code < 0 ? 0 : code;  // -1: the negative of the top code, whose nearest is -0.993
  }
  return std::uint8_t(code);
}

// The float32 scale of a block from the largest of its magnitudes' bit patterns (an
// integer maximum: NaN patterns exceed infinity, which exceeds every finite value, so
// the result does not depend on the order of the elements).
FO_HD float quant_scale(std::uint32_t max_abs_bits) { return bits_float(max_abs_bits); }

// What encoding a block with this scale does: 0 the values are multiplied by
// 1 / scale; 1 all values are zero, or some is inf or NaN (every code is the zero code);
// 2 the scale is subnormal, so 1 / scale overflows: the values and the scale are first
// multiplied by 2^64 (exactly).
FO_HD int quant_block_kind(std::uint32_t max_abs_bits) {
  return max_abs_bits == 0u || max_abs_bits >= 0x7f800000u ? 1 : max_abs_bits < 0x00800000u ? 2 : 0;
}

constexpr float kQuantRescale = 18446744073709551616.0f;  // 2^64

// The multiplier of a block's values before encoding (kind 0 and 2 above): 1 / scale,
// or 1 / (scale * 2^64) for a subnormal scale (then the values are multiplied by 2^64).
FO_HD float quant_inverse(float scale, int kind) {
  return kind == 2 ? 1.0f / (scale * kQuantRescale) : 1.0f / scale;
}

// The zero code of a map.
template <bool Signed>
FO_HD std::uint8_t quant_zero_code() {
  return Signed ? 127 : 0;
}

}  // namespace fo
