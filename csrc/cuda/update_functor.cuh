// The per-chunk operation of the CUDA driver: load every slot of an element,
// hand it to fo::update_element (csrc/core/element.h), store the slots back.
// Like the CPU driver, it owns the memory traffic and nothing else: the update,
// the rounding to 16 bits and the master-weight or Kahan write-back are the very
// code the CPU runs, and so is the random stream of stochastic rounding (element
// i of tensor j draws random_bits(tensor_key(key, j), i)), so for a given key the
// two devices produce the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../core/element.h"
#include "../core/two_pass.h"

namespace fo::cuda {

// N consecutive values of T, aligned to their size: one vector load or store.
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

constexpr int widest(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

// SR: 16-bit params are written back with stochastic rounding; a kernel of its own
// (the host picks it from the call's mode), as the CPU runs it as a loop of its own.
// E: the layout has an EMA slot (type P) after the extra buffer's.
template <class Rule, class M, Extra X, class P, class S, bool SR, bool E = false>
struct UpdateFunctor {
  static_assert(!SR || sizeof(P) == 2, "stochastic rounding is for 16-bit params");
  using Hyper = typename Rule::Hyper;
  using XS = typename ExtraStorage<X, P>::type;
  using RuleType = Rule;
  using MathType = M;
  using ParamType = P;
  using StateType = S;
  static constexpr Extra kExtraKind = X;
  static constexpr int kStates = Rule::kStates;
  static constexpr int kS = kStates > 0 ? kStates : 1;  // no zero-length arrays
  static constexpr bool kExtra = X != Extra::None;
  static constexpr int kSlots = 2 + kStates + (kExtra ? 1 : 0) + (E ? 1 : 0);

  // Elements per vector access: as many as make the widest slot's access 16 bytes.
  // A layout with mixed widths (16-bit params, float32 states or master) moves 4
  // elements per access, 8 bytes of each 16-bit slot and 16 of each 4-byte one.
  // Stochastic rounding takes at most 4 (8-byte accesses for 16-bit slots): its
  // longer per-element code with 8 elements in flight would spill registers.
  static constexpr int kWidest = widest(int(sizeof(P)), kStates > 0 ? int(sizeof(S)) : 0,
                                         kExtra ? int(sizeof(XS)) : 0);
  static constexpr int kVec = SR && 16 / kWidest > 4 ? 4 : 16 / kWidest;

  Hyper h;              // the Hyper of every tensor, per-step scalars filled (unless `table`)
  const Hyper* table;   // device memory: one Hyper per tensor of the call, or null
  Mode mode;
  const double* scale;  // device memory: {skip, coef, norm} from grad_stats, or null
  const double* count;  // device memory: the step count t of this update, or null
  // device memory: a two-pass rule's sums, reduce_count<Rule>() per tensor of the call,
  // from which each block completes its tensor's Hyper (Rule::finish); null otherwise
  const double* sums = nullptr;

  // One element: the gradient scaled as on the CPU, then the shared update. `m` is
  // the call's Mode with its rounding fixed at compile time, so the update has one
  // rounding path and no per-element branch.
  __device__ __forceinline__ static void element(const Hyper& hb, const Mode& m, M gscale,
                                                 std::uint64_t key, std::int64_t i, P& p, P g,
                                                 S* s, XS& x, P& e) {
    const std::uint32_t rnd = SR ? random_bits(key, std::uint64_t(i)) : 0u;
    update_element<Rule, M, X, E>(hb, m, rnd, p, load<M>(g) * gscale, s, x, e);
  }

  template <class T>
  __device__ __forceinline__ static bool aligned(const void* ptr) {
    return std::uintptr_t(ptr) % (sizeof(T) * kVec) == 0;
  }

  // What a block needs besides its pointers: the hyperparameters with the per-step
  // scalars filled, and the gradient scale.
  struct Block {
    Hyper h;
    double grad_scale;
    std::uint64_t key;  // the call's random stream
  };

  // One thread reads the block's settings (the call's Hyper or the tensor's row of
  // the table, the skip flag and coefficient, the device-side step count and the
  // random stream that goes with it) and
  // shares them in shared memory; null: skip the whole block, and nothing is read
  // or written. The loop reads the settings from there: values that may live in
  // memory rather than in registers across the whole loop leave the registers to
  // the data, which keeps every layout free of spills.
  __device__ __forceinline__ const Block* begin_block(std::int64_t j) const {
    __shared__ Block shared;
    __shared__ int shared_skip;
    if (threadIdx.x == 0) {
      const bool skip = scale != nullptr && scale[0] != 0.0;
      Hyper one = table != nullptr ? table[j] : h;
      // The same at_step as the host's; only the device's pow may round
      // differently in the last bit, which is why the host computes these
      // scalars unless the count lives on the device.
      // With the count on the device, mode.key is the seed of the stream and the
      // stream is the host's step_key(seed, t) for that count.
      std::uint64_t key = mode.key;
      if (count != nullptr && !skip) {
        Rule::at_step(one, *count);
        key = step_key(mode.key, std::uint64_t(*count));
      }
      if constexpr (reduce_count<Rule>() > 0) {
        if (sums != nullptr && !skip) Rule::finish(one, sums + j * reduce_count<Rule>());
      }
      shared = Block{one, scale != nullptr ? mode.grad_scale * scale[1] : mode.grad_scale, key};
      shared_skip = skip ? 1 : 0;
    }
    __syncthreads();
    return shared_skip == 0 ? &shared : nullptr;
  }

  // Updates elements [begin, end) of tensor j; ptr = {param, grad, states..., extra}.
  __device__ __forceinline__ void operator()(const Block* b, void* const* ptr, std::int64_t j,
                                             std::int64_t begin, std::int64_t end,
                                             std::int64_t) const {
    const Hyper& hb = b->h;
    const M gscale = M(b->grad_scale);
    Mode m = mode;
    m.stochastic = SR ? 1.0 : 0.0;
    const std::uint64_t key = tensor_key(b->key, j);

    P* p = static_cast<P*>(ptr[0]);
    const P* g = static_cast<const P*>(ptr[1]);
    S* st[kS];
    bool vec = aligned<P>(ptr[0]) && aligned<P>(ptr[1]);
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      st[k] = static_cast<S*>(ptr[2 + k]);
      vec = vec && aligned<S>(ptr[2 + k]);
    }
    XS* xp = nullptr;
    if constexpr (kExtra) {
      xp = static_cast<XS*>(ptr[2 + kStates]);
      vec = vec && aligned<XS>(xp);
    }
    P* ep = nullptr;
    if constexpr (E) {
      ep = static_cast<P*>(ptr[2 + kStates + (kExtra ? 1 : 0)]);
      vec = vec && aligned<P>(ep);
    }

    // Vector body: only when every slot is aligned to its access. begin is a
    // multiple of kChunk, hence of kVec, so each vector of the chunk is aligned
    // too. A tensor with any misaligned slot (a view offset by one element, say)
    // runs entirely on the scalar loop, which is still coalesced, only narrower.
    std::int64_t vend = begin;
    if (vec) {
      vend = begin + (end - begin) / kVec * kVec;
      const std::int64_t stride = std::int64_t(blockDim.x) * kVec;
      for (std::int64_t i = begin + std::int64_t(threadIdx.x) * kVec; i < vend; i += stride) {
        // All loads first, then the math, then all stores: the loads of every
        // slot are independent and in flight together.
        Vec<P, kVec> pv = *reinterpret_cast<const Vec<P, kVec>*>(p + i);
        const Vec<P, kVec> gv = *reinterpret_cast<const Vec<P, kVec>*>(g + i);
        Vec<S, kVec> sv[kS];
#pragma unroll
        for (int k = 0; k < kStates; ++k) sv[k] = *reinterpret_cast<const Vec<S, kVec>*>(st[k] + i);
        Vec<XS, kVec> xv{};
        if constexpr (kExtra) xv = *reinterpret_cast<const Vec<XS, kVec>*>(xp + i);
        Vec<P, kVec> ev{};
        if constexpr (E) ev = *reinterpret_cast<const Vec<P, kVec>*>(ep + i);
#pragma unroll
        for (int l = 0; l < kVec; ++l) {
          S s[kS];
#pragma unroll
          for (int k = 0; k < kStates; ++k) s[k] = sv[k].v[l];
          element(hb, m, gscale, key, i + l, pv.v[l], gv.v[l], s, xv.v[l], ev.v[l]);
#pragma unroll
          for (int k = 0; k < kStates; ++k) sv[k].v[l] = s[k];
        }
        *reinterpret_cast<Vec<P, kVec>*>(p + i) = pv;
#pragma unroll
        for (int k = 0; k < kStates; ++k) *reinterpret_cast<Vec<S, kVec>*>(st[k] + i) = sv[k];
        if constexpr (kExtra) *reinterpret_cast<Vec<XS, kVec>*>(xp + i) = xv;
        if constexpr (E) *reinterpret_cast<Vec<P, kVec>*>(ep + i) = ev;
      }
    }

    // Scalar loop: misaligned tensors, and the last < kVec elements of a tensor.
    for (std::int64_t i = vend + threadIdx.x; i < end; i += blockDim.x) {
      P pv = p[i];
      S s[kS];
#pragma unroll
      for (int k = 0; k < kStates; ++k) s[k] = st[k][i];
      XS xv{};
      if constexpr (kExtra) xv = xp[i];
      P ev{};
      if constexpr (E) ev = ep[i];
      element(hb, m, gscale, key, i, pv, g[i], s, xv, ev);
      p[i] = pv;
#pragma unroll
      for (int k = 0; k < kStates; ++k) st[k][i] = s[k];
      if constexpr (kExtra) xp[i] = xv;
      if constexpr (E) ep[i] = ev;
    }
  }
};

}  // namespace fo::cuda
