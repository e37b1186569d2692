// The first pass of a two-pass rule (csrc/core/two_pass.h) on the CPU: every
// tensor's sums of the rule's per-element terms, with a result that does not depend
// on the thread count or the instruction set.
//
// As in reduce.h, each tensor is cut into fixed blocks of kBlock elements and each
// block is summed by one thread: lane l of a block adds the terms of elements
// l, l + kLanes, ... in order, and the lanes are added in lane order. A tensor's sum
// is its blocks' sums added in block order on one thread. The terms themselves are
// the rule's arithmetic, rounded the same way by every build (no FMA contraction),
// so every thread count and instruction set gives the same bits.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../core/two_pass.h"
#include "reduce.h"

namespace fo::cpu::FO_ISA_NS {

// Sums of the terms of elements [lo, hi) of one tensor, one per term, into out.
template <class Rule, class M, Extra X, class P, class S, std::size_t... K>
void reduce_block(const typename Rule::Hyper& h, const Mode& mode, const std::uint64_t* slot,
                  std::int64_t lo, std::int64_t hi, double* out, std::index_sequence<K...>) {
  using XS = typename ExtraStorage<X, P>::type;
  constexpr int R = reduce_count<Rule>();
  const typename Rule::Hyper hc = h;
  const M gscale = M(mode.grad_scale);
  const P* __restrict p = reinterpret_cast<const P*>(slot[0]);
  const P* __restrict g = reinterpret_cast<const P*>(slot[1]);
  const S* __restrict s[sizeof...(K) + 1] = {reinterpret_cast<const S*>(slot[2 + K])..., nullptr};
  const XS* __restrict x = reinterpret_cast<const XS*>(slot[2 + sizeof...(K)]);
  auto term = [&](std::int64_t i) {
    // states only where the rule's reduce reads them (LAMB's moments, not LARS's trace)
    const S sv[sizeof...(K) + 1] = {(Rule::kReduceReadsStates ? s[K][i] : S{})..., S{}};
    const XS xv = X != Extra::None ? x[i] : XS{};
    return reduce_element<Rule, M, X>(hc, p[i], load<M>(g[i]) * gscale, sv, xv);
  };
  double acc[R][kLanes] = {};
  std::int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const Terms<R> t = term(i + l);
      for (int r = 0; r < R; ++r) acc[r][l] += t.v[r];
    }
  }
  for (int l = 0; i < hi; ++i, ++l) {
    const Terms<R> t = term(i);
    for (int r = 0; r < R; ++r) acc[r][l] += t.v[r];
  }
  for (int r = 0; r < R; ++r) {
    double sum = 0.0;
    for (int l = 0; l < kLanes; ++l) sum += acc[r][l];
    out[r] = sum;
  }
}

// sums[j * R + r]: sum r of tensor j (R = the rule's reduce_count), for the Hyper of
// every tensor (h[j], or h[0] for all).
template <class Rule, class M, Extra X, class P, class S>
std::vector<double> reduce_per_tensor(const Table& t, const typename Rule::Hyper* h,
                                      bool per_tensor, const Mode& mode, int max_threads) {
  constexpr int R = reduce_count<Rule>();
  constexpr int NS = Rule::kStates;
  constexpr int nslots = 2 + NS + (X != Extra::None ? 1 : 0);
  std::vector<std::int64_t> owner, start;  // block k: elements [start, +kBlock) of owner
  std::int64_t total = 0;
  for (std::int64_t j = 0; j < t.n; ++j) {
    for (std::int64_t lo = 0; lo < t.sizes[j]; lo += kBlock) {
      owner.push_back(j);
      start.push_back(lo);
    }
    total += t.sizes[j];
  }
  std::vector<double> sums(std::size_t(t.n) * R, 0.0);
  const std::int64_t nblocks = std::int64_t(owner.size());
  if (nblocks == 0) return sums;
  std::vector<double> partial(std::size_t(nblocks) * R, 0.0);
  const int nthreads =
      int(std::max<std::int64_t>(1, std::min<std::int64_t>(max_threads, total / kMinPerThread)));
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (std::int64_t k = 0; k < nblocks; ++k) {
    const std::int64_t j = owner[std::size_t(k)], lo = start[std::size_t(k)];
    std::uint64_t slot[nslots + 1];
    for (int q = 0; q < nslots; ++q) slot[q] = t.ptrs[q * t.n + j];
    slot[nslots] = 0;
    reduce_block<Rule, M, X, P, S>(h[per_tensor ? j : 0], mode, slot, lo,
                                   std::min(lo + kBlock, t.sizes[j]),
                                   partial.data() + std::size_t(k) * R,
                                   std::make_index_sequence<NS>{});
  }
  for (std::int64_t k = 0; k < nblocks; ++k)  // in block order, per tensor
    for (int r = 0; r < R; ++r)
      sums[std::size_t(owner[std::size_t(k)]) * R + r] += partial[std::size_t(k) * R + r];
  return sums;
}

}  // namespace fo::cpu::FO_ISA_NS
