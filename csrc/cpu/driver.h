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

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/element.h"
#include "table.h"

// The templates below are compiled once per instruction set (kernels.cpp), so they
// live in that instruction set's namespace: with one shared name, the linker would
// keep a single copy of each instantiation (the first object's) for every set.
#ifndef FO_ISA_NS
#error "driver.h belongs to the per-instruction-set kernels: define FO_ISA_NS"
#endif

namespace fo::cpu::FO_ISA_NS {

// The widest vector this instruction set's build uses, as a template like the driver's,
// so that a test can tell whether each set really runs its own code.
template <int = 0>
int vector_bits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__)
  return 256;
#else
  return 128;
#endif
}

constexpr std::int64_t kAlign = 64;          // elements: a whole number of cache lines
constexpr std::int64_t kMinPerThread = 1 << 15;  // below this, threads cost more than they save
constexpr std::uint64_t kLine = 64;               // bytes of a cache line
constexpr std::int64_t kChunk = 16;   // elements per software prefetch (a line of float32)
constexpr std::int64_t kAhead = 512;  // how far ahead it asks, in elements

// body(nt, id) on `nthreads` threads (nt: how many run, id: this one's index). One
// thread runs it inline: an OpenMP region, even of one thread, makes its team anew (an
// aligned allocation and its free, and a system call), which cost a small step (a few
// thousand elements) about as much as its kernel.
template <class F>
inline void parallel(int nthreads, F&& body) {
  if (nthreads <= 1) {
    body(1, 0);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  body(omp_get_num_threads(), omp_get_thread_num());
}

// Elements [lo, hi) of one tensor piece; slot holds its pointers (param, grad, states,
// extra buffer (X), EMA (E)). Element i draws the random bits random_bits(key, base + i):
// `base` is the index of the slots' first element in its tensor when the slots point
// into its middle. `PF`: a long range runs in chunks that prefetch (the dense driver's
// pieces; the staged and row-sparse loops run short ranges and leave it out).
template <class Rule, class M, Extra X, class P, class S, bool SR, bool E = false,
          bool PF = false, std::size_t... K>
void update_range_impl(const typename Rule::Hyper& h, const Mode& mode, std::uint64_t key,
                       const std::uint64_t* slot, std::int64_t lo, std::int64_t hi,
                       std::index_sequence<K...>, std::uint64_t base = 0) {
  using XS = typename ExtraStorage<X, P>::type;
  // Local copies: their fields are known not to alias the arrays, so the compiler
  // hoists them and if-converts the rules' flag selects into vector blends.
  const typename Rule::Hyper hc = h;
  const Mode mc = mode;
  const M gscale = M(mode.grad_scale);
  // One restrict pointer per slot, unpacked at compile time so that the loop body
  // has no inner loops left for the vectorizer to trip on.
  P* __restrict p = reinterpret_cast<P*>(slot[0]);
  const P* __restrict g = reinterpret_cast<const P*>(slot[1]);
  S* __restrict s[sizeof...(K) + 1] = {reinterpret_cast<S*>(slot[2 + K])..., nullptr};
  XS* __restrict x = reinterpret_cast<XS*>(slot[2 + sizeof...(K)]);
  P* __restrict e = reinterpret_cast<P*>(slot[2 + sizeof...(K) + (X != Extra::None ? 1 : 0)]);
  auto one = [&](std::int64_t i) __attribute__((always_inline)) {
    P pv = p[i];
    S sv[sizeof...(K) + 1] = {s[K][i]..., S{}};
    XS xv = X != Extra::None ? x[i] : XS{};
    P ev = E ? e[i] : P{};
    const std::uint32_t rnd = SR ? random_bits(key, base + std::uint64_t(i)) : 0u;
    update_element_as<Rule, M, X, SR, E>(hc, mc, rnd, pv, load<M>(g[i]) * gscale, sv, xv, ev);
    p[i] = pv;
    ((s[K][i] = sv[K]), ...);
    if constexpr (X != Extra::None) x[i] = xv;
    if constexpr (E) e[i] = ev;
  };
  // With PF, long pieces run in chunks of kChunk elements, each asking for every
  // array's memory kAhead elements ahead (software prefetch). The hardware's stream
  // prefetchers stop at each 4 KiB page and ramp up again, and a rule with a long chain
  // of arithmetic per element (Adam's square root and division) then waits on memory it
  // could have asked for earlier. Every element runs the same instructions either way:
  // no result changes.
  std::int64_t i0 = lo;
  if constexpr (PF) {
    for (; hi - lo >= 4 * kAhead && i0 + kChunk <= hi; i0 += kChunk) {
      __builtin_prefetch(p + i0 + kAhead, 1);
      __builtin_prefetch(g + i0 + kAhead, 0);
      (__builtin_prefetch(s[K] + i0 + kAhead, 1), ...);
      if constexpr (X != Extra::None) __builtin_prefetch(x + i0 + kAhead, 1);
      if constexpr (E) __builtin_prefetch(e + i0 + kAhead, 1);
#pragma GCC ivdep
      for (std::int64_t i = i0; i < i0 + kChunk; ++i) one(i);
    }
  }
#pragma GCC ivdep
  for (std::int64_t i = i0; i < hi; ++i) one(i);
}

#if defined(__F16C__)
// float16 params (without Kahan buffers) in builds with the conversion instructions: a
// block of params and gradients is converted to float, runs through the same loop as
// float params (the master copy, states and L1 as ever), and the params are rounded
// back, to nearest even or stochastically. The instructions convert exactly as
// f16_bits_float and f16_nearest do, NaN included (a test compares them on every
// value), so the bits are the other builds' bits; the integer conversions they replace
// cost more than the memory traffic.
constexpr std::int64_t kStage = 256;

inline void halves_to_float(const f16* src, float* dst, std::int64_t n) {
  std::int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_store_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                 reinterpret_cast<const __m256i*>(src + i))));
#endif
  for (; i + 8 <= n; i += 8)
    _mm256_store_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                 reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].bits);
}

inline void float_to_halves(const float* src, f16* dst, std::int64_t n) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  std::int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_load_ps(src + i), kNearest));
#endif
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_load_ps(src + i), kNearest));
  for (; i < n; ++i) dst[i].bits = _cvtss_sh(src[i], kNearest);
}

// f16_stochastic lane by lane, with the conversion instructions for its roundings to
// nearest and its conversions back: the same operations in the same order, so the
// same bits.
inline void float_to_halves_stochastic(const float* src, const std::uint32_t* rnd, f16* dst,
                                       std::int64_t n) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  std::int64_t i = 0;
#if defined(__AVX512F__)
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), one = _mm512_set1_epi32(1);
  const __m512i low16 = _mm512_set1_epi32(0xffff);
  const __m512 unit = _mm512_set1_ps(5.9604645e-08f);
  for (; i + 16 <= n; i += 16) {
    const __m512 f = _mm512_load_ps(src + i);
    const __m256i r16 = _mm512_cvtps_ph(f, kNearest);
    const __m512 fr = _mm512_cvtph_ps(r16);
    const __m512i r = _mm512_cvtepu16_epi32(r16);
    const __m512 af = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(f), abs_mask));
    const __m512 afr = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(fr), abs_mask));
    const __mmask16 away = _mm512_cmp_ps_mask(af, afr, _CMP_GT_OQ);
    const __m512i other =
        _mm512_and_si512(_mm512_mask_add_epi32(_mm512_sub_epi32(r, one), away, r, one), low16);
    const __m512 gap = _mm512_sub_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(other)), fr);
    const __m512 prob = _mm512_div_ps(_mm512_sub_ps(f, fr), gap);
    const __m512i bits = _mm512_srli_epi32(_mm512_load_si512(rnd + i), 8);
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(bits), unit);
    const __mmask16 up = _mm512_cmp_ps_mask(u, prob, _CMP_LT_OQ);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(up, r, other)));
  }
#else
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), one = _mm256_set1_epi32(1);
  const __m256i low16 = _mm256_set1_epi32(0xffff);
  const __m256 unit = _mm256_set1_ps(5.9604645e-08f);
  const auto narrow = [](__m256i x) {  // 8 values below 2^16 to 16 bits
    return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  };
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_load_ps(src + i);
    const __m128i r16 = _mm256_cvtps_ph(f, kNearest);
    const __m256 fr = _mm256_cvtph_ps(r16);
    const __m256i r = _mm256_cvtepu16_epi32(r16);
    const __m256 af = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(f), abs_mask));
    const __m256 afr = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(fr), abs_mask));
    const __m256i away = _mm256_castps_si256(_mm256_cmp_ps(af, afr, _CMP_GT_OQ));
    const __m256i other = _mm256_and_si256(
        _mm256_blendv_epi8(_mm256_sub_epi32(r, one), _mm256_add_epi32(r, one), away), low16);
    const __m256 gap = _mm256_sub_ps(_mm256_cvtph_ps(narrow(other)), fr);
    const __m256 prob = _mm256_div_ps(_mm256_sub_ps(f, fr), gap);
    const __m256i bits = _mm256_srli_epi32(
        _mm256_load_si256(reinterpret_cast<const __m256i*>(rnd + i)), 8);
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(bits), unit);
    const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(u, prob, _CMP_LT_OQ));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     narrow(_mm256_blendv_epi8(r, other, up)));
  }
#endif
  for (; i < n; ++i) dst[i].bits = f16_stochastic(src[i], rnd[i]);
}

template <class Rule, class M, Extra X, bool SR, bool E, class S, std::size_t... K>
void update_range_f16(const typename Rule::Hyper& h, const Mode& mode, std::uint64_t key,
                      const std::uint64_t* slot, std::int64_t lo, std::int64_t hi,
                      std::index_sequence<K...> states) {
  static_assert(std::is_same_v<M, float> && X != Extra::Kahan);
  constexpr std::size_t NS = sizeof...(K);
  alignas(64) float pf[kStage], gf[kStage];
  alignas(64) std::uint32_t rnd[SR ? kStage : 1];
  f16* p = reinterpret_cast<f16*>(slot[0]);
  const f16* g = reinterpret_cast<const f16*>(slot[1]);
  for (std::int64_t at = lo; at < hi; at += kStage) {
    const std::int64_t n = std::min(kStage, hi - at);
    halves_to_float(p + at, pf, n);
    halves_to_float(g + at, gf, n);
    // the block's slots: float params and gradients here, states and master weights
    // (float) where they are; the loop runs over [0, n)
    std::uint64_t block[2 + NS + 2] = {std::uint64_t(pf), std::uint64_t(gf),
                                       (slot[2 + K] + std::uint64_t(at) * sizeof(S))..., 0, 0};
    if constexpr (X == Extra::Master) block[2 + NS] = slot[2 + NS] + std::uint64_t(at) * 4;
    update_range_impl<Rule, M, X, float, S, false, false>(h, mode, 0, block, 0, n, states);
    if constexpr (SR) {
      for (std::int64_t k = 0; k < n; ++k) rnd[k] = random_bits(key, std::uint64_t(at + k));
      float_to_halves_stochastic(pf, rnd, p + at, n);
    } else {
      float_to_halves(pf, p + at, n);
    }
    if constexpr (E) {  // the EMA follows the rounded params, as in the other builds
      f16* e = reinterpret_cast<f16*>(slot[2 + NS + (X != Extra::None ? 1 : 0)]);
      for (std::int64_t k = at; k < at + n; ++k) e[k] = ema_update<float>(e[k], p[k], mode.ema_decay);
    }
  }
}
#endif

// `h` holds one Hyper for all tensors (per_tensor false) or one per tensor, so that
// K optimizer settings (a hyperparameter search, an ensemble) step in one call.
template <class Rule, class M, Extra X, bool E, class P, class S>
void run(const Table& t, const typename Rule::Hyper* h, bool per_tensor, const Mode& mode,
         int max_threads) {
  constexpr int NS = Rule::kStates;
  constexpr int nslots = 2 + NS + (X != Extra::None ? 1 : 0) + (E ? 1 : 0);
  // offsets[j] = first global element of tensor j
  std::vector<std::int64_t> offsets(std::size_t(t.n) + 1, 0);
  for (std::int64_t j = 0; j < t.n; ++j) offsets[j + 1] = offsets[j] + t.sizes[j];
  const std::int64_t total = offsets[t.n];
  if (total == 0) return;
  const std::int64_t want = (total + kMinPerThread - 1) / kMinPerThread;
  const int nthreads = int(std::max<std::int64_t>(1, std::min<std::int64_t>(max_threads, want)));

  parallel(nthreads, [&](const int nt, const int id) {
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
        std::uint64_t slot[nslots + 1];
        for (int k = 0; k < nslots; ++k) slot[k] = t.ptrs[k * t.n + j];
        slot[nslots] = 0;
        const auto& hj = h[per_tensor ? j : 0];
        const std::uint64_t key = tensor_key(mode.key, j);
        auto update = [&](std::int64_t from, std::int64_t to) {
          if (from >= to) return;
#if defined(__F16C__)
          if constexpr (std::is_same_v<P, f16> && X != Extra::Kahan) {
            if (mode.stochastic != 0.0)
              update_range_f16<Rule, M, X, true, E, S>(hj, mode, key, slot, from, to,
                                                       std::make_index_sequence<NS>{});
            else
              update_range_f16<Rule, M, X, false, E, S>(hj, mode, key, slot, from, to,
                                                        std::make_index_sequence<NS>{});
            return;
          }
#endif
          // stochastic rounding is a separate loop, not a branch inside one
          if (is_16bit<P>() && mode.stochastic != 0.0)
            update_range_impl<Rule, M, X, P, S, is_16bit<P>(), E, true>(
                hj, mode, key, slot, from, to, std::make_index_sequence<NS>{});
          else
            update_range_impl<Rule, M, X, P, S, false, E, true>(hj, mode, key, slot, from, to,
                                                          std::make_index_sequence<NS>{});
        };
        // The first elements up to a cache-line boundary of the widest array run on
        // their own, so that the vector loop's accesses do not straddle cache lines
        // (NumPy's large arrays start 16 bytes into a page). Every element gets the
        // same instructions either way: the split changes no result.
        const bool by_state = NS > 0 && sizeof(S) > sizeof(P);
        const std::size_t width = by_state ? sizeof(S) : sizeof(P);
        const std::uint64_t at = (by_state ? slot[2] : slot[0]) + std::uint64_t(a) * width;
        const std::int64_t peel = at % width ? 0 : std::int64_t((kLine - at % kLine) % kLine / width);
        update(a, std::min(b, a + peel));
        update(std::min(b, a + peel), b);
      }
    }
  });
}

}  // namespace fo::cpu::FO_ISA_NS
