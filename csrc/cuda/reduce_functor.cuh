// The first pass of a two-pass rule (csrc/core/two_pass.h) on the GPU: every
// tensor's sums of the rule's per-element terms, deterministic and on the device.
//
// Each block of the multi-tensor launcher (one chunk of one tensor) adds its
// elements' terms per thread in a fixed order and the threads' sums in a fixed tree
// (block_sum), and writes kR partial sums for its block; sum_chunks_per_tensor then
// adds each tensor's chunks in chunk order. No atomics: the same sums on every run.
// The update pass reads them from device memory (UpdateFunctor::sums), so nothing
// returns to the host between the passes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/two_pass.h"
#include "block_sum.cuh"
#include "update_functor.cuh"

namespace fo::cuda {

template <class Rule, class M, Extra X, class P, class S>
struct ReduceFunctor {
  // the update's settings: the same Hyper (per-step fields filled), gradient scale and
  // skip as the update pass sees them
  using Setup = UpdateFunctor<Rule, M, X, P, S, false>;
  using Block = typename Setup::Block;
  using XS = typename ExtraStorage<X, P>::type;
  static constexpr int kR = reduce_count<Rule>();
  static constexpr int kStates = Rule::kStates;
  static constexpr int kS = kStates > 0 ? kStates : 1;
  static constexpr bool kExtra = X != Extra::None;

  Setup setup;      // its sums are null: the Hyper is not completed here
  double* partial;  // kR sums per block of the call

  __device__ __forceinline__ const Block* begin_block(std::int64_t j) const {
    return setup.begin_block(j);
  }

  // Sums the terms of elements [begin, end) of tensor j into partial[block * kR + r].
  __device__ __forceinline__ void operator()(const Block* b, void* const* ptr, std::int64_t,
                                             std::int64_t begin, std::int64_t end,
                                             std::int64_t block) const {
    const M gscale = M(b->grad_scale);
    const P* p = static_cast<const P*>(ptr[0]);
    const P* g = static_cast<const P*>(ptr[1]);
    const S* st[kS];
#pragma unroll
    for (int k = 0; k < kStates; ++k) st[k] = static_cast<const S*>(ptr[2 + k]);
    const XS* xp = kExtra ? static_cast<const XS*>(ptr[2 + kStates]) : nullptr;
    double acc[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] = 0.0;
#pragma unroll 4
    for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      S s[kS];
      if constexpr (Rule::kReduceReadsStates) {  // only where the rule's reduce reads them
#pragma unroll
        for (int k = 0; k < kStates; ++k) s[k] = st[k][i];
      }
      XS xv{};
      if constexpr (kExtra) xv = xp[i];
      const Terms<kR> t = reduce_element<Rule, M, X>(b->h, p[i], load<M>(g[i]) * gscale, s, xv);
#pragma unroll
      for (int r = 0; r < kR; ++r) acc[r] += t.v[r];
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const double sum = block_sum(acc[r]);
      if (threadIdx.x == 0) partial[block * kR + r] = sum;
    }
  }
};

// sums[j * R + r] = the partial sums r of tensor j's chunks, blocks first[j] to
// first[j + 1] - 1 of the first pass, added in chunk order (0 for an empty tensor).
template <int R>
__global__ void sum_chunks_per_tensor(const double* partial, const std::int64_t* first,
                                      std::int64_t n, double* sums) {
  const std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  for (int r = 0; r < R; ++r) {
    double s = 0.0;
    for (std::int64_t k = first[j]; k < first[j + 1]; ++k) s += partial[k * R + r];
    sums[j * R + r] = s;
  }
}

}  // namespace fo::cuda
