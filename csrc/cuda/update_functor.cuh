// The per-chunk operation of the CUDA driver: load every slot of an element,
// run the rule from csrc/core on it, store the param and the states back.
// Like the CPU driver, it owns the memory traffic and nothing else; the update
// itself is the very `Rule::step` the CPU runs, so the two cannot drift apart.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fo::cuda {

// T: storage type of every slot; M: the math type the rule runs in.
template <class Rule, class T, class M>
struct UpdateFunctor {
  static constexpr int kStates = Rule::kStates;
  static constexpr int kSlots = kStates > 0 ? kStates : 1;  // no zero-length arrays
  static constexpr int kVec = 16 / int(sizeof(T));          // elements per 16-byte access
  static_assert(16 % sizeof(T) == 0, "storage type must divide a 16-byte vector");

  // One 16-byte vector of T; alignas makes nvcc emit a single 128-bit load or store.
  struct alignas(16) Vec {
    T v[kVec];
  };

  typename Rule::Hyper h;

  // One element: what both paths below do per lane.
  __device__ __forceinline__ void update(T& p, T g, T* s) const {
    M pm = M(p);
    M sm[kSlots];
#pragma unroll
    for (int k = 0; k < kStates; ++k) sm[k] = M(s[k]);
    Rule::template step<M>(h, pm, M(g), sm);
    p = T(pm);
#pragma unroll
    for (int k = 0; k < kStates; ++k) s[k] = T(sm[k]);
  }

  // Updates elements [begin, end) of one tensor; ptr = {param, grad, states...}.
  __device__ __forceinline__ void operator()(void* const* ptr, std::int64_t begin,
                                             std::int64_t end) const {
    T* p = static_cast<T*>(ptr[0]);
    const T* g = static_cast<const T*>(ptr[1]);
    T* st[kSlots];
    std::uintptr_t bits = std::uintptr_t(ptr[0]) | std::uintptr_t(ptr[1]);
#pragma unroll
    for (int k = 0; k < kStates; ++k) {
      st[k] = static_cast<T*>(ptr[2 + k]);
      bits |= std::uintptr_t(ptr[2 + k]);
    }

    // Vector body: only when every slot is 16-byte aligned. begin is a multiple
    // of kChunk, hence of kVec, so each vector of the chunk is aligned too. A
    // tensor with any misaligned slot (a view offset by one element, say) runs
    // entirely on the scalar loop, which is still coalesced, only narrower.
    std::int64_t vend = begin;
    if (bits % 16 == 0) {
      vend = begin + (end - begin) / kVec * kVec;
      const std::int64_t stride = std::int64_t(blockDim.x) * kVec;
      for (std::int64_t i = begin + std::int64_t(threadIdx.x) * kVec; i < vend; i += stride) {
        // All loads first, then the math, then all stores: the loads of the
        // 2 + kStates streams are independent and in flight together.
        Vec pv = *reinterpret_cast<const Vec*>(p + i);
        const Vec gv = *reinterpret_cast<const Vec*>(g + i);
        Vec sv[kSlots];
#pragma unroll
        for (int k = 0; k < kStates; ++k) sv[k] = *reinterpret_cast<const Vec*>(st[k] + i);
#pragma unroll
        for (int l = 0; l < kVec; ++l) {
          T s[kSlots];
#pragma unroll
          for (int k = 0; k < kStates; ++k) s[k] = sv[k].v[l];
          update(pv.v[l], gv.v[l], s);
#pragma unroll
          for (int k = 0; k < kStates; ++k) sv[k].v[l] = s[k];
        }
        *reinterpret_cast<Vec*>(p + i) = pv;
#pragma unroll
        for (int k = 0; k < kStates; ++k) *reinterpret_cast<Vec*>(st[k] + i) = sv[k];
      }
    }

    // Scalar loop: misaligned tensors, and the last < kVec elements of a tensor.
    for (std::int64_t i = vend + threadIdx.x; i < end; i += blockDim.x) {
      T s[kSlots];
#pragma unroll
      for (int k = 0; k < kStates; ++k) s[k] = st[k][i];
      update(p[i], g[i], s);
#pragma unroll
      for (int k = 0; k < kStates; ++k) st[k][i] = s[k];
    }
  }
};

}  // namespace fo::cuda
