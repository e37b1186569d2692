// LARS (You et al. 2017), with optax.lars's equations: the gradient plus weight decay,
// scaled per tensor by trust_coefficient |p| / (|u| + eps) (1 where either norm is 0)
// and by -lr, then a momentum trace. A two-pass rule (two_pass.h): the first pass sums
// p^2 and u^2 per tensor.
//   u = g + wd p;  u <- -lr ratio u;  t <- u + momentum t;
//   p <- p + t, or with Nesterov p <- p + u + momentum t.
// State: momentum_buffer (the trace t), unless Momentum is false (momentum 0, no
// buffer: p <- p + u).
#pragma once
#include "common.h"
#include "two_pass.h"

namespace fo {

// finish fills scale = -lr * ratio of the tensor.
struct LarsHyper {
  FO_FIELDS(lr, momentum, weight_decay, trust_coefficient, eps, nesterov);
  FO_STEP_FIELDS(scale);
};

template <bool Momentum>
struct Lars : NoStepScalars {
  using Hyper = LarsHyper;
  static constexpr int kStates = Momentum ? 1 : 0;
  static constexpr int kReduce = 2;  // sum p^2, sum u^2
  static constexpr bool kReduceReadsStates = false;

  template <class M>
  FO_HD static M direction(const Hyper& h, M p, M g) {
    return h.weight_decay != 0.0 ? g + M(h.weight_decay) * p : g;
  }

  template <class M>
  FO_HD static Terms<2> reduce(const Hyper& h, M p, M g, const M*) {
    const double u = double(direction(h, p, g)), pd = double(p);
    return {{pd * pd, u * u}};
  }

  FO_HD static void finish(Hyper& h, const double* sums) {
    h.scale = -h.lr * trust_ratio(sums[0], sums[1], h.trust_coefficient, h.eps);
  }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    const M u = M(h.scale) * direction(h, p, g);
    if constexpr (Momentum) {
      M& t = s[0];
      t = u + M(h.momentum) * t;
      p = p + (h.nesterov != 0.0 ? u + M(h.momentum) * t : t);
    } else {
      p = p + u;
    }
  }
};

}  // namespace fo
