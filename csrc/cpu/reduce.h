// Multi-tensor reductions (dot products) with a result that does not depend on
// the thread count: the elements of all tensors are cut into fixed blocks of
// kBlock elements (per tensor), each block is summed by one thread, and the
// block sums are added in block order on one thread. Threads only decide who
// computes a block, never how a sum is associated.
#pragma once

#include <omp.h>

#include <cstdint>
#include <vector>

#include "../core/precision.h"
#include "driver.h"

namespace fo::cpu::FO_ISA_NS {

constexpr std::int64_t kBlock = 1 << 14;

// Sum over all tensors j of sum_i a_j[i] * b_j[i], accumulated in double; T is any
// storage type of csrc/core/precision.h.
template <class T>
double dot(const Table& t, int max_threads) {
  // block k covers elements [lo, lo + kBlock) of tensor owner[k]
  std::vector<std::int64_t> owner, start;
  std::int64_t total = 0;
  for (std::int64_t j = 0; j < t.n; ++j) {
    for (std::int64_t lo = 0; lo < t.sizes[j]; lo += kBlock) {
      owner.push_back(j);
      start.push_back(lo);
    }
    total += t.sizes[j];
  }
  const std::int64_t nblocks = std::int64_t(owner.size());
  if (nblocks == 0) return 0.0;
  std::vector<double> partial(std::size_t(nblocks), 0.0);
  const int nthreads =
      int(std::max<std::int64_t>(1, std::min<std::int64_t>(max_threads, total / kMinPerThread)));
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (std::int64_t k = 0; k < nblocks; ++k) {
    const std::int64_t j = owner[std::size_t(k)], lo = start[std::size_t(k)];
    const std::int64_t hi = std::min(lo + kBlock, t.sizes[j]);
    const T* a = reinterpret_cast<const T*>(t.ptrs[j]);
    const T* b = reinterpret_cast<const T*>(t.ptrs[t.n + j]);
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (std::int64_t i = lo; i < hi; ++i) s += load<double>(a[i]) * load<double>(b[i]);
    partial[std::size_t(k)] = s;
  }
  double sum = 0.0;
  for (double s : partial) sum += s;
  return sum;
}

}  // namespace fo::cpu::FO_ISA_NS
