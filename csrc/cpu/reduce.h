// Multi-tensor reductions (dot products) with a result that does not depend on
// the thread count: the elements of all tensors are cut into fixed blocks of
// kBlock elements (per tensor), each block is summed by one thread, and the
// block sums are added in block order on one thread. Threads only decide who
// computes a block, never how a sum is associated.
#pragma once

#include <omp.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../core/precision.h"
#include "driver.h"

namespace fo::cpu::FO_ISA_NS {

constexpr std::int64_t kBlock = 1 << 14;
// Partial sums of a block: lane l adds the terms l, l + kLanes, ...; the lanes are
// then added in lane order. The association is the same whatever the vector width
// the compiler picks, so every instruction set gives the same bits.
constexpr int kLanes = 32;

template <class Term>
double block_sum(std::int64_t lo, std::int64_t hi, const Term& term) {
  double acc[kLanes] = {};
  std::int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  }
  for (int l = 0; i < hi; ++i, ++l) acc[l] += term(i);
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// Sum over the blocks of all tensors of `term(j)(i)`, the term of element i of tensor j.
template <class TermOf>
double reduce(const Table& t, int max_threads, const TermOf& term_of) {
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
    partial[std::size_t(k)] = block_sum(lo, std::min(lo + kBlock, t.sizes[j]), term_of(j));
  }
  double sum = 0.0;
  for (double s : partial) sum += s;
  return sum;
}

// Sum over all tensors j of sum_i a_j[i] * b_j[i] (a two-slot table), in double; T is
// any storage type of csrc/core/precision.h.
template <class T>
double dot(const Table& t, int max_threads) {
  return reduce(t, max_threads, [&](std::int64_t j) {
    const T* a = reinterpret_cast<const T*>(t.ptrs[j]);
    const T* b = reinterpret_cast<const T*>(t.ptrs[t.n + j]);
    return [a, b](std::int64_t i) { return load<double>(a[i]) * load<double>(b[i]); };
  });
}

// Sum of squares over all tensors of a one-slot table, in double. The square of a
// float32, float16 or bfloat16 value is exact in double, and that of a float16 value
// already in float (11 significant bits, at most 2^32); only the sum rounds.
template <class T>
double sumsq(const Table& t, int max_threads) {
  return reduce(t, max_threads, [&](std::int64_t j) {
    const T* a = reinterpret_cast<const T*>(t.ptrs[j]);
    return [a](std::int64_t i) {
      if constexpr (std::is_same_v<T, f16>) {
        const float x = load<float>(a[i]);
        return double(x * x);
      } else {
        const double x = load<double>(a[i]);
        return x * x;
      }
    };
  });
}

}  // namespace fo::cpu::FO_ISA_NS
