// The per-chunk operation of the CUDA driver for blockwise 8-bit state (csrc/core/quant8.h):
// one warp per block of kQuantBlock elements. Each lane decodes its 8 elements of every
// state (element at + lane + 32 e: coalesced accesses), runs fo::update_element on them
// (the CPU's code, with float states), the warp takes each state's largest magnitude
// with shuffles, and each lane encodes its elements with quant_encode, the CPU's
// formula: for a given key both devices write the same params, codes and scales.
//
// Pointer slots: param, grad, the states' codes, the extra buffer (if any), then one
// float32 scale array per state. Chunks (kChunk elements) are whole numbers of blocks,
// so a block never spans two thread blocks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/element.h"
#include "../core/quant8.h"
#include "multi_tensor.cuh"

namespace fo::cuda {

static_assert(kChunk % kQuantBlock == 0, "a chunk must hold whole blocks of 8-bit state");

// The code maps in device memory; each thread block copies them to shared memory.
static __device__ const QuantMap kDeviceQuantMaps[2] = {kQuantUnsigned, kQuantSigned};

template <class Rule, class M, Extra X, class P, bool SR>
struct QuantFunctor {
  static_assert(!SR || sizeof(P) == 2, "stochastic rounding is for 16-bit params");
  static_assert(Rule::kStates > 0, "8-bit state needs a rule with states");
  using Hyper = typename Rule::Hyper;
  using XS = typename ExtraStorage<X, P>::type;
  static constexpr int kStates = Rule::kStates;
  static constexpr bool kExtra = X != Extra::None;
  static constexpr int kSlots = 2 + kStates + (kExtra ? 1 : 0) + kStates;
  static constexpr int kPerLane = kQuantBlock / 32;

  Hyper h;              // the Hyper of every tensor, per-step scalars filled (unless `table`)
  const Hyper* table;   // device memory: one Hyper per tensor of the call, or null
  Mode mode;
  const double* scale;  // device memory: {skip, coef, norm} from grad_stats, or null
  const double* count;  // device memory: the step count t of this update, or null

  struct Block {
    Hyper h;
    double grad_scale;
    std::uint64_t key;
    QuantMap maps[2];  // unsigned, signed
  };

  // As UpdateFunctor::begin_block, and the code maps copied to shared memory.
  __device__ __forceinline__ const Block* begin_block(std::int64_t j) const {
    __shared__ Block shared;
    __shared__ int shared_skip;
    {
      const float* src = reinterpret_cast<const float*>(kDeviceQuantMaps);
      float* dst = reinterpret_cast<float*>(shared.maps);
      constexpr int kWords = int(sizeof(shared.maps) / sizeof(float));
      for (int w = threadIdx.x; w < kWords; w += blockDim.x) dst[w] = src[w];
    }
    if (threadIdx.x == 0) {
      const bool skip = scale != nullptr && scale[0] != 0.0;
      Hyper one = table != nullptr ? table[j] : h;
      std::uint64_t key = mode.key;
      if (count != nullptr && !skip) {
        Rule::at_step(one, *count);
        key = step_key(mode.key, std::uint64_t(*count));
      }
      shared.h = one;
      shared.grad_scale = scale != nullptr ? mode.grad_scale * scale[1] : mode.grad_scale;
      shared.key = key;
      shared_skip = skip ? 1 : 0;
    }
    __syncthreads();
    return shared_skip == 0 ? &shared : nullptr;
  }

  __device__ __forceinline__ static std::uint32_t warp_max(std::uint32_t v) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const std::uint32_t o = __shfl_xor_sync(0xffffffffu, v, d);
      v = o > v ? o : v;
    }
    return v;
  }

  // Updates elements [begin, end) of tensor j, one warp per block of kQuantBlock.
  __device__ __forceinline__ void operator()(const Block* b, void* const* ptr, std::int64_t j,
                                             std::int64_t begin, std::int64_t end,
                                             std::int64_t) const {
    const Hyper& hb = b->h;
    const M gscale = M(b->grad_scale);
    Mode m = mode;
    m.stochastic = SR ? 1.0 : 0.0;
    const std::uint64_t key = tensor_key(b->key, j);
    P* p = static_cast<P*>(ptr[0]);
    const P* g = static_cast<const P*>(ptr[1]);
    XS* xp = kExtra ? static_cast<XS*>(ptr[2 + kStates]) : nullptr;
    const int lane = int(threadIdx.x) & 31;
    const int warps = int(blockDim.x) >> 5;
    for (std::int64_t at = begin + std::int64_t(threadIdx.x >> 5) * kQuantBlock; at < end;
         at += std::int64_t(warps) * kQuantBlock) {
      const std::int64_t blk = at / kQuantBlock;
      float v[kStates][kPerLane];
      std::uint32_t mx[kStates];
      float sc[kStates];
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        mx[k] = 0u;
        sc[k] = static_cast<const float*>(ptr[2 + kStates + (kExtra ? 1 : 0) + k])[blk];
      }
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const std::int64_t i = at + lane + 32 * e;
        if (i >= end) break;
        float s[kStates];
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          const QuantMap& q = b->maps[(mode.unsigned_states >> k) & 1u ? 0 : 1];
          s[k] = q.code[static_cast<const std::uint8_t*>(ptr[2 + k])[i]] * sc[k];
        }
        P pv = p[i];
        XS xv{};
        if constexpr (kExtra) xv = xp[i];
        const std::uint32_t rnd = SR ? random_bits(key, std::uint64_t(i)) : 0u;
        P unused{};  // (no EMA slot with 8-bit state)
        update_element<Rule, M, X>(hb, m, rnd, pv, load<M>(g[i]) * gscale, s, xv, unused);
        p[i] = pv;
        if constexpr (kExtra) xp[i] = xv;
#pragma unroll
        for (int k = 0; k < kStates; ++k) {
          v[k][e] = s[k];
          const std::uint32_t a = float_bits(s[k]) & 0x7fffffffu;
          mx[k] = a > mx[k] ? a : mx[k];
        }
      }
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        const std::uint32_t top = warp_max(mx[k]);
        const float bscale = quant_scale(top);
        const int kind = quant_block_kind(top);
        const float pre = kind == 2 ? kQuantRescale : 1.0f;
        const float inv = kind == 1 ? 0.0f : quant_inverse(bscale, kind);
        const bool unsigned_map = ((mode.unsigned_states >> k) & 1u) != 0u;
        const QuantMap& q = b->maps[unsigned_map ? 0 : 1];
        std::uint8_t* codes = static_cast<std::uint8_t*>(ptr[2 + k]);
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) {
          const std::int64_t i = at + lane + 32 * e;
          if (i >= end) break;
          const float y = kind == 2 ? (v[k][e] * pre) * inv : v[k][e] * inv;
          codes[i] = kind == 1 ? (unsigned_map ? quant_zero_code<false>() : quant_zero_code<true>())
                     : unsigned_map ? quant_encode<false>(y, q)
                                    : quant_encode<true>(y, q);
        }
        if (lane == 0)
          static_cast<float*>(ptr[2 + kStates + (kExtra ? 1 : 0) + k])[blk] = bscale;
      }
    }
  }
};

}  // namespace fo::cuda
