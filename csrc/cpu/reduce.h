// Multi-tensor reductions (dot products) with a result that does not depend on
// the thread count: the elements of all tensors are cut into fixed blocks of
// kBlock elements (per tensor), each block is summed by one thread, and the
// block sums are added in block order on one thread. Threads only decide who
// computes a block, never how a sum is associated.
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
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

// Sum over the blocks of all tensors; `block_of(j)(lo, hi)` sums elements [lo, hi) of
// tensor j.
template <class BlockOf>
double reduce(const Table& t, int max_threads, const BlockOf& block_of) {
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
    partial[std::size_t(k)] = block_of(j)(lo, std::min(lo + kBlock, t.sizes[j]));
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
    const auto product = [a, b](std::int64_t i) { return load<double>(a[i]) * load<double>(b[i]); };
    return [product](std::int64_t lo, std::int64_t hi) { return block_sum(lo, hi, product); };
  });
}

// kLanes 16-bit values as floats (exact conversions): lane l holds src[l].
template <class T>
void load_lanes(const T* src, float* dst) {
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) dst[l] = to_float(src[l]);
}

// bfloat16 in another order: lane l < 16 holds src[2l] and lane 16 + l src[2l + 1], the
// low and high halves of 32-bit words, so that a shift and a mask convert a whole
// vector of words, with no widening shuffle. Every build uses this order, so the sums
// agree bit for bit.
inline void load_lanes(const bf16* src, float* dst) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_loadu_si512(src);
  const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
  _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  _mm512_storeu_ps(dst + 16, _mm512_castsi512_ps(_mm512_and_si512(w, high)));
#elif defined(__AVX2__)
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  for (int h = 0; h < 2; ++h) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * h));
    _mm256_storeu_ps(dst + 8 * h, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    _mm256_storeu_ps(dst + 16 + 8 * h, _mm256_castsi256_ps(_mm256_and_si256(w, high)));
  }
#else
  for (int l = 0; l < kLanes / 2; ++l) {
    dst[l] = to_float(src[2 * l]);
    dst[kLanes / 2 + l] = to_float(src[2 * l + 1]);
  }
#endif
}

#if defined(__AVX512F__) || defined(__F16C__)
// float16 through the conversion instruction: the integer path of to_float is several
// times slower and would bound the reduction below memory speed.
inline void load_lanes(const f16* src, float* dst) {
#if defined(__AVX512F__)
  for (int l = 0; l < kLanes; l += 16)
    _mm512_storeu_ps(dst + l, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + l))));
#else
  for (int l = 0; l < kLanes; l += 8)
    _mm256_storeu_ps(dst + l, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + l))));
#endif
}
#endif

// Sum of squares of a[lo, hi) for 16-bit storage. The square of a float16 or bfloat16
// value is exact in float (at most 16 and 22 significant bits), so each lane first
// sums runs of kRun squares in float, at twice the vector width of double, and adds
// that partial sum to its double accumulator; the rest of the block, under one run
// of all lanes, goes through `square` (double). (Squares below 2^-126, of values under
// 2^-63, lose bits; they cannot move a norm that any check compares with.)
template <class T, class Square>
double sumsq16_block(const T* a, std::int64_t lo, std::int64_t hi, const Square& square) {
  constexpr int kRun = 16;
  double acc[kLanes] = {};
  std::int64_t i = lo;
  for (; i + kLanes * kRun <= hi; i += kLanes * kRun) {
    float part[kLanes] = {};
    for (int r = 0; r < kRun; ++r) {
      float x[kLanes];
      load_lanes(a + i + r * kLanes, x);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) part[l] += x[l] * x[l];
    }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += double(part[l]);
  }
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s + block_sum(i, hi, square);
}

// Sum of squares over all tensors of a one-slot table, in double.
template <class T>
double sumsq(const Table& t, int max_threads) {
  return reduce(t, max_threads, [&](std::int64_t j) {
    const T* a = reinterpret_cast<const T*>(t.ptrs[j]);
    const auto square = [a](std::int64_t i) {
      const double x = load<double>(a[i]);
      return x * x;
    };
    if constexpr (sizeof(T) == 2) {
      return [a, square](std::int64_t lo, std::int64_t hi) {
        // a bfloat16 square can overflow float (|x| >= 2^64): an infinite float sum
        // is summed again in double
        const double s = sumsq16_block(a, lo, hi, square);
        return s == s && s - s != s - s ? block_sum(lo, hi, square) : s;
      };
    } else {
      return [square](std::int64_t lo, std::int64_t hi) { return block_sum(lo, hi, square); };
    }
  });
}

}  // namespace fo::cpu::FO_ISA_NS
