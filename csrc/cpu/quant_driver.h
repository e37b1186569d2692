// The CPU driver for blockwise 8-bit state (csrc/core/quant8.h): the same update rules
// and the same per-element code (update_range_impl) as driver.h, over blocks of
// kQuantBlock elements whose states are decoded into float buffers on the stack,
// updated there, and encoded back, in one pass over memory.
//
// Pointer table of a call: param, grad, the states' codes, the extra buffer of the
// layout (if any), then one float32 scale array per state (quant_blocks(n) scales).
// Threads split the elements of all tensors into ranges that begin and end on block
// boundaries (of the block's own tensor), so that every block is decoded, updated and
// encoded by one thread, with the same instructions whatever the thread count.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/quant8.h"
#include "../core/stream.h"
#include "driver.h"
#include "quant.h"

namespace fo::cpu::FO_ISA_NS {

// One block of n <= kQuantBlock elements starting at element `at` of a tensor whose
// slots are `slot` (param, grad, codes..., extra, scales...).
template <class Rule, class M, Extra X, class P, bool SR, std::size_t... K>
void update_block_q8(const typename Rule::Hyper& h, const Mode& mode, std::uint64_t key,
                     const std::uint64_t* slot, std::int64_t at, std::int64_t n,
                     std::index_sequence<K...> states) {
  constexpr std::size_t NS = sizeof...(K);
  using XS = typename ExtraStorage<X, P>::type;
  const std::int64_t block = at / kQuantBlock;
  auto codes = [&](std::size_t k) { return reinterpret_cast<q8*>(slot[2 + k]) + at; };
  auto scale = [&](std::size_t k) {
    return reinterpret_cast<float*>(slot[2 + NS + (X != Extra::None ? 1 : 0) + k]) + block;
  };
  auto is_unsigned = [&](std::size_t k) { return ((mode.unsigned_states >> k) & 1u) != 0u; };
  alignas(64) float s[NS][kQuantBlock];
  for (std::size_t k = 0; k < NS; ++k)
    decode_block(codes(k), *scale(k), is_unsigned(k) ? kQuantUnsigned.code : kQuantSigned.code,
                 s[k], n);
  const std::uint64_t x = X != Extra::None ? slot[2 + NS] + std::uint64_t(at) * sizeof(XS) : 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<P, f16> && X != Extra::Kahan) {
    // float16 params through the conversion instructions, as driver.h's staged loop
    alignas(64) float pf[kQuantBlock], gf[kQuantBlock];
    alignas(64) std::uint32_t rnd[SR ? kQuantBlock : 1];
    f16* p = reinterpret_cast<f16*>(slot[0]) + at;
    halves_to_float(p, pf, n);
    halves_to_float(reinterpret_cast<const f16*>(slot[1]) + at, gf, n);
    const std::uint64_t local[2 + NS + 2] = {std::uint64_t(pf), std::uint64_t(gf),
                                             std::uint64_t(s[K])..., x, 0};
    update_range_impl<Rule, M, X, float, float, false>(h, mode, 0, local, 0, n, states);
    if constexpr (SR) {
      for (std::int64_t i = 0; i < n; ++i) rnd[i] = random_bits(key, std::uint64_t(at + i));
      float_to_halves_stochastic(pf, rnd, p, n);
    } else {
      float_to_halves(pf, p, n);
    }
  } else
#endif
  {
    const std::uint64_t local[2 + NS + 2] = {slot[0] + std::uint64_t(at) * sizeof(P),
                                             slot[1] + std::uint64_t(at) * sizeof(P),
                                             std::uint64_t(s[K])..., x, 0};
    update_range_impl<Rule, M, X, P, float, SR>(h, mode, key, local, 0, n, states,
                                                std::uint64_t(at));
  }
  for (std::size_t k = 0; k < NS; ++k) {
    if (is_unsigned(k))
      encode_block<false>(s[k], n, codes(k), scale(k), kQuantUnsigned);
    else
      encode_block<true>(s[k], n, codes(k), scale(k), kQuantSigned);
  }
}

// The streaming probe (stream.h) in this layout: the same memory traffic as an update
// (params and gradients, every state's codes and scales read and written), with one
// add per buffer and no decoding: the limit an 8-bit update can reach.
template <class Rule, class P, std::size_t... K>
void stream_block_q8(const typename Rule::Hyper& h, const std::uint64_t* slot, std::int64_t at,
                     std::int64_t n, bool has_extra, std::index_sequence<K...>) {
  constexpr std::size_t NS = sizeof...(K);
  const float c = float(h.scale);
  const std::uint8_t ci = std::uint8_t(int(h.scale));
  P* __restrict p = reinterpret_cast<P*>(slot[0]) + at;
  const P* __restrict g = reinterpret_cast<const P*>(slot[1]) + at;
  std::uint8_t* __restrict s[NS + 1] = {reinterpret_cast<std::uint8_t*>(slot[2 + K]) + at..., nullptr};
#pragma GCC ivdep
  for (std::int64_t i = 0; i < n; ++i) {
    p[i] = Store<P>::template apply<false>(load<float>(p[i]) + c * load<float>(g[i]), 0);
    ((s[K][i] = std::uint8_t(s[K][i] + ci)), ...);
  }
  const std::size_t first_scale = 2 + NS + (has_extra ? 1 : 0);
  ((reinterpret_cast<float*>(slot[first_scale + K])[at / kQuantBlock] += c), ...);
}

template <class Rule, class M, Extra X, class P>
void run_q8(const Table& t, const typename Rule::Hyper* h, bool per_tensor, const Mode& mode,
            int max_threads) {
  constexpr int NS = Rule::kStates;
  constexpr int nslots = 2 + NS + (X != Extra::None ? 1 : 0) + NS;
  std::vector<std::int64_t> offsets(std::size_t(t.n) + 1, 0);
  for (std::int64_t j = 0; j < t.n; ++j) offsets[j + 1] = offsets[j] + t.sizes[j];
  const std::int64_t total = offsets[t.n];
  if (total == 0) return;
  const std::int64_t want = (total + kMinPerThread - 1) / kMinPerThread;
  const int nthreads = int(std::max<std::int64_t>(1, std::min<std::int64_t>(max_threads, want)));

  parallel(nthreads, [&](const int nt, const int id) {
    // thread k starts at the block that holds element total * k / nt (that block's
    // first element), so every range begins and ends on a block boundary of its tensor
    auto bound = [&](int k) {
      if (k >= nt) return total;
      const std::int64_t e = total / nt * k + total % nt * k / nt;
      const std::int64_t j = std::int64_t(std::upper_bound(offsets.begin(), offsets.end(), e) -
                                          offsets.begin()) - 1;
      return offsets[j] + (e - offsets[j]) / kQuantBlock * kQuantBlock;
    };
    const std::int64_t lo = bound(id), hi = bound(id + 1);
    if (lo < hi) {
      std::int64_t j = std::int64_t(std::upper_bound(offsets.begin(), offsets.end(), lo) -
                                    offsets.begin()) - 1;
      for (; j < t.n && offsets[j] < hi; ++j) {
        const std::int64_t a = std::max(lo, offsets[j]) - offsets[j];
        const std::int64_t b = std::min(hi, offsets[j + 1]) - offsets[j];
        if (a >= b) continue;
        std::uint64_t slot[nslots];
        for (int k = 0; k < nslots; ++k) slot[k] = t.ptrs[k * t.n + j];
        const auto& hj = h[per_tensor ? j : 0];
        const std::uint64_t key = tensor_key(mode.key, j);
        for (std::int64_t at = a; at < b; at += kQuantBlock) {
          const std::int64_t n = std::min<std::int64_t>(kQuantBlock, b - at);
          if constexpr (IsStreamProbe<Rule>::value) {
            stream_block_q8<Rule, P>(hj, slot, at, n, X != Extra::None,
                                     std::make_index_sequence<NS>{});
          } else if (is_16bit<P>() && mode.stochastic != 0.0) {
            update_block_q8<Rule, M, X, P, is_16bit<P>()>(hj, mode, key, slot, at, n,
                                                          std::make_index_sequence<NS>{});
          } else {
            update_block_q8<Rule, M, X, P, false>(hj, mode, key, slot, at, n,
                                                  std::make_index_sequence<NS>{});
          }
        }
      }
    }
  });
}

}  // namespace fo::cpu::FO_ISA_NS
