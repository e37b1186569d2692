// The CPU driver of row-sparse steps: an update rule from csrc/core on the rows a
// row-sparse gradient touches (an embedding's gradient as row indices and one row of
// values per index), and on nothing else: the other rows of the params and of their
// state keep their bits.
//
// Tensor j has rows of row_len[j] elements; its gradient holds counts[j] rows of
// values (one after the other, in the table's gradient slot), for the rows whose
// indices are rows[j][0..counts[j]). The indices must be distinct (a coalesced
// gradient: repeats summed first), so that no two threads write one row. The rows of
// all tensors of a call are split into one contiguous range per thread; each row runs
// through the dense driver's loop (update_range_impl) with its slots offset to the row.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "driver.h"

#ifndef FO_ISA_NS
#error "rows.h belongs to the per-instruction-set kernels: define FO_ISA_NS"
#endif

namespace fo::cpu::FO_ISA_NS {

template <class Rule, class M, Extra X, class P, class S>
void run_rows(const Table& t, const RowsTable& r, const typename Rule::Hyper* h, bool per_tensor,
              const Mode& mode, int max_threads) {
  using XS = typename ExtraStorage<X, P>::type;
  constexpr int NS = Rule::kStates;
  constexpr int nslots = 2 + NS + (X != Extra::None ? 1 : 0);
  // first[j] = index of tensor j's first row among the rows of the call
  std::vector<std::int64_t> first(std::size_t(t.n) + 1, 0);
  std::int64_t work = 0;
  for (std::int64_t j = 0; j < t.n; ++j) {
    first[j + 1] = first[j] + r.counts[j];
    work += r.counts[j] * r.row_len[j];
  }
  const std::int64_t total = first[t.n];
  if (total == 0 || work == 0) return;
  const std::int64_t want = (work + kMinPerThread - 1) / kMinPerThread;
  const int nthreads = int(std::max<std::int64_t>(1, std::min<std::int64_t>(max_threads, want)));

#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (std::int64_t q = 0; q < total; ++q) {
    const std::int64_t j =
        std::int64_t(std::upper_bound(first.begin(), first.end(), q) - first.begin()) - 1;
    const std::int64_t i = q - first[j];
    const std::int64_t len = r.row_len[j];
    const std::int64_t row = reinterpret_cast<const std::int64_t*>(r.rows[j])[i];
    const std::uint64_t at = std::uint64_t(row * len), from = std::uint64_t(i * len);
    std::uint64_t slot[nslots + 1];
    slot[0] = t.ptrs[j] + at * sizeof(P);
    slot[1] = t.ptrs[t.n + j] + from * sizeof(P);
    for (int k = 0; k < NS; ++k) slot[2 + k] = t.ptrs[(2 + k) * t.n + j] + at * sizeof(S);
    if constexpr (X != Extra::None) slot[2 + NS] = t.ptrs[(2 + NS) * t.n + j] + at * sizeof(XS);
    slot[nslots] = 0;
    const auto& hj = h[per_tensor ? j : 0];
    // stochastic rounding: element k of row `row` of tensor j draws its bits from a
    // stream of that row, whichever rows the call touches
    const std::uint64_t key = tensor_key(tensor_key(mode.key, j), row);
    if (is_16bit<P>() && mode.stochastic != 0.0)
      update_range_impl<Rule, M, X, P, S, is_16bit<P>(), false>(
          hj, mode, key, slot, 0, len, std::make_index_sequence<NS>{});
    else
      update_range_impl<Rule, M, X, P, S, false, false>(hj, mode, key, slot, 0, len,
                                                        std::make_index_sequence<NS>{});
  }
}

}  // namespace fo::cpu::FO_ISA_NS
