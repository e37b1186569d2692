// The CPU multi-tensor driver: one OpenMP parallel region per call over the
// concatenated elements of every tensor in the call.
//
// The total element count is split into one contiguous range per thread, with
// boundaries on multiples of kAlign elements, so that 1000 small tensors cost
// the same as one large one. Inside a range each tensor piece runs as one
// `#pragma omp simd` loop over the shared rule from csrc/core. Every element is
// updated by the same instructions whatever the thread count, so results are
// bit-identical across thread counts.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fo::cpu {

// Pointers of one call: ptrs[slot * n + j] is the address of slot `slot`
// (0 = param, 1 = grad, 2.. = states) of tensor j; sizes[j] its element count.
struct Table {
  const std::uint64_t* ptrs;
  const std::int64_t* sizes;
  std::int64_t n;
};

constexpr std::int64_t kAlign = 64;          // elements: a whole number of cache lines
constexpr std::int64_t kMinPerThread = 1 << 15;  // below this, threads cost more than they save

template <class Rule, class T, class M, std::size_t... K>
void update_range_impl(const typename Rule::Hyper& h, T* __restrict p, const T* __restrict g,
                       T* const* st, std::int64_t lo, std::int64_t hi, std::index_sequence<K...>) {
  // A local copy: its fields are known not to alias the arrays, so the compiler
  // hoists them and if-converts the rules' flag selects into vector blends.
  const typename Rule::Hyper hc = h;
  // One restrict pointer per state slot, unpacked at compile time so that the
  // loop body has no inner loops left for the vectorizer to trip on.
  T* __restrict s[sizeof...(K) + 1] = {st[K]..., nullptr};
#pragma GCC ivdep
  for (std::int64_t i = lo; i < hi; ++i) {
    M pv = M(p[i]);
    M sv[sizeof...(K) + 1] = {M(s[K][i])..., M(0)};
    Rule::template step<M>(hc, pv, M(g[i]), sv);
    p[i] = T(pv);
    ((s[K][i] = T(sv[K])), ...);
  }
}

template <class Rule, class T, class M>
void update_range(const typename Rule::Hyper& h, T* p, const T* g, T* const* st,
                  std::int64_t lo, std::int64_t hi) {
  update_range_impl<Rule, T, M>(h, p, g, st, lo, hi, std::make_index_sequence<Rule::kStates>{});
}

// `h` holds one Hyper for all tensors (per_tensor false) or one per tensor, so that
// K optimizer settings (a hyperparameter search, an ensemble) step in one call.
template <class Rule, class T, class M>
void run(const Rule& rule, const Table& t, const typename Rule::Hyper* h, bool per_tensor,
         int max_threads) {
  constexpr int NS = Rule::kStates;
  // offsets[j] = first global element of tensor j
  std::vector<std::int64_t> offsets(std::size_t(t.n) + 1, 0);
  for (std::int64_t j = 0; j < t.n; ++j) offsets[j + 1] = offsets[j] + t.sizes[j];
  const std::int64_t total = offsets[t.n];
  if (total == 0) return;
  const std::int64_t want = (total + kMinPerThread - 1) / kMinPerThread;
  const int nthreads = int(std::max<std::int64_t>(1, std::min<std::int64_t>(max_threads, want)));

#pragma omp parallel num_threads(nthreads)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    auto bound = [&](int k) {
      if (k >= nt) return total;
      const std::int64_t b = (total / kAlign) * k / nt * kAlign;
      return std::min(b, total);
    };
    const std::int64_t lo = bound(id), hi = bound(id + 1);
    if (lo < hi) {
      // first tensor whose range contains lo
      std::int64_t j = std::int64_t(std::upper_bound(offsets.begin(), offsets.end(), lo) -
                                    offsets.begin()) - 1;
      for (; j < t.n && offsets[j] < hi; ++j) {
        const std::int64_t a = std::max(lo, offsets[j]) - offsets[j];
        const std::int64_t b = std::min(hi, offsets[j + 1]) - offsets[j];
        if (a >= b) continue;
        T* st[NS > 0 ? NS : 1];
        for (int k = 0; k < NS; ++k) st[k] = reinterpret_cast<T*>(t.ptrs[(2 + k) * t.n + j]);
        update_range<Rule, T, M>(h[per_tensor ? j : 0], reinterpret_cast<T*>(t.ptrs[j]),
                                 reinterpret_cast<const T*>(t.ptrs[t.n + j]), st, a, b);
      }
    }
  }
}

}  // namespace fo::cpu
