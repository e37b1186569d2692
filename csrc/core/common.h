// Shared definitions for the per-element update rules.
//
// A rule is a struct with
//   using Hyper = ...;              // plain struct of doubles, filled on the host
//   static constexpr int kStates;   // number of state buffers it reads and writes
//   template <class M> FO_HD static void step(const Hyper&, M& p, M g, M* s);
//   FO_HD static void at_step(Hyper&, double t);  // per-step scalars from the count t
//                                                 // (a no-op for rules without any)
// `step` is pure arithmetic on values of the math type M (float or double):
// the drivers load each slot from memory, call the rule, and store the slots
// back. The rule never touches memory itself, so the CPU and CUDA drivers
// (and any storage precision) share the exact same update.
#pragma once

#include <cmath>

#include "hyper.h"

#if defined(__CUDACC__)
#define FO_HD __host__ __device__ __forceinline__
#else
#define FO_HD inline __attribute__((always_inline))
#endif

namespace fo {

// The at_step of rules whose math does not depend on the step count.
struct NoStepScalars {
  template <class Hyper>
  FO_HD static void at_step(Hyper&, double) {}
};

template <class M>
FO_HD M fo_sqrt(M x) {
  return std::sqrt(x);  // float and double overloads; both map to IEEE sqrt
}

// Negates the gradient when maximizing and adds L2 weight decay: the common
// prologue of every torch.optim rule ("g = -g if maximize; g += wd * p").
template <class M>
FO_HD M prepare_grad(M g, M p, bool maximize, double wd) {
  g = maximize ? -g : g;
  return wd != 0.0 ? g + M(wd) * p : g;
}

// torch.lerp(a, b, w) = a + w (b - a), in the form torch's CPU vector kernel computes it,
// and its CUDA kernel once contracted: fma(w, b - a, a) for |w| < 0.5, else
// fma(w - 1, b - a, b). The fused multiply-add is written out (the kernels are
// otherwise built without contraction), so the bits are torch's.
template <class M>
FO_HD M fo_lerp(M a, M b, M w) {
  const bool small = std::fabs(w) < M(0.5);
  return std::fma(small ? w : w - M(1), b - a, small ? a : b);
}

// torch.optim.swa_utils' EMA (AveragedModel with get_ema_multi_avg_fn): the average e
// moves toward the param p as torch.lerp(e, p, 1 - decay).
template <class M>
FO_HD M ema_lerp(M e, M p, double decay) {
  return fo_lerp(e, p, M(1.0 - decay));
}

}  // namespace fo
