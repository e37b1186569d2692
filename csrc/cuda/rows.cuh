// The CUDA driver of row-sparse steps (the CPU's is csrc/cpu/rows.h): an update rule on
// the rows a row-sparse gradient touches, and on nothing else. One block per touched
// row (grid-stride over the rows of every tensor of the call), its threads over the
// row's elements; the per-tensor addresses, the device addresses of the row indices,
// the row lengths and the index of each tensor's first row travel in a small table in
// device memory, ordered on the call's stream. Row indices are read on the device: the
// host never waits for them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/element.h"
#include "runtime.cuh"

namespace fo::cuda {

template <int NSlots>
struct RowsMeta {
  std::uint64_t ptr[NSlots];  // param, gradient rows, states..., extra (bases)
  std::uint64_t rows;         // device address of the tensor's int64 row indices
  std::int64_t first;         // index of the tensor's first row among the call's rows
  std::int64_t len;           // elements per row
};

template <class Rule, class M, Extra X, class P, class S, int NSlots>
__global__ void __launch_bounds__(kBlockThreads)
    rows_kernel(const RowsMeta<NSlots>* meta, std::int64_t n, std::int64_t total,
                typename Rule::Hyper h, const typename Rule::Hyper* table, Mode mode) {
  using XS = typename ExtraStorage<X, P>::type;
  constexpr int NS = Rule::kStates;
  constexpr int kS = NS > 0 ? NS : 1;
  const M gscale = M(mode.grad_scale);
  for (std::int64_t q = blockIdx.x; q < total; q += gridDim.x) {
    std::int64_t lo = 0, hi = n - 1;  // the last tensor whose first row is <= q
    while (lo < hi) {
      const std::int64_t mid = (lo + hi + 1) / 2;
      if (meta[mid].first <= q) lo = mid; else hi = mid - 1;
    }
    const RowsMeta<NSlots>& mt = meta[lo];
    const std::int64_t i = q - mt.first;
    const std::int64_t row = reinterpret_cast<const std::int64_t*>(mt.rows)[i];
    const std::int64_t at = row * mt.len;
    const typename Rule::Hyper& hb = table != nullptr ? table[lo] : h;
    const std::uint64_t key = tensor_key(tensor_key(mode.key, lo), row);
    P* p = reinterpret_cast<P*>(mt.ptr[0]) + at;
    const P* g = reinterpret_cast<const P*>(mt.ptr[1]) + i * mt.len;
    S* st[kS];
#pragma unroll
    for (int k = 0; k < NS; ++k) st[k] = reinterpret_cast<S*>(mt.ptr[2 + k]) + at;
    XS* xp = nullptr;
    if constexpr (X != Extra::None) xp = reinterpret_cast<XS*>(mt.ptr[2 + NS]) + at;
    for (std::int64_t k = threadIdx.x; k < mt.len; k += blockDim.x) {
      P pv = p[k];
      S s[kS];
#pragma unroll
      for (int c = 0; c < NS; ++c) s[c] = st[c][k];
      XS xv{};
      if constexpr (X != Extra::None) xv = xp[k];
      P unused{};
      const std::uint32_t rnd = mode.stochastic != 0.0 ? random_bits(key, std::uint64_t(k)) : 0u;
      update_element<Rule, M, X>(hb, mode, rnd, pv, load<M>(g[k]) * gscale, s, xv, unused);
      p[k] = pv;
#pragma unroll
      for (int c = 0; c < NS; ++c) st[c][k] = s[c];
      if constexpr (X != Extra::None) xp[k] = xv;
    }
  }
}

}  // namespace fo::cuda
