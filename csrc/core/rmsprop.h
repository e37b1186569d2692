// RMSprop with optional momentum and centering (torch.optim.RMSprop).
// State order: square_avg, then momentum_buffer if Momentum, then grad_avg if Centered.
#pragma once
#include "common.h"

namespace fo {

struct RmspropHyper {
  FO_FIELDS(lr, alpha, eps, weight_decay, momentum, maximize);
};

template <bool Momentum, bool Centered>
struct Rmsprop : NoStepScalars {
  using Hyper = RmspropHyper;
  static constexpr int kStates = 1 + int(Momentum) + int(Centered);

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = prepare_grad(g, p, h.maximize != 0.0, h.weight_decay);
    const M a = M(h.alpha), one_minus_a = M(1.0 - h.alpha);
    M& v = s[0];
    v = a * v + one_minus_a * g * g;
    M avg;
    if constexpr (Centered) {
      M& gbar = s[1 + int(Momentum)];
      gbar = a * gbar + one_minus_a * g;
      avg = fo_sqrt(v - gbar * gbar) + M(h.eps);
    } else {
      avg = fo_sqrt(v) + M(h.eps);
    }
    if constexpr (Momentum) {
      M& b = s[1];
      b = M(h.momentum) * b + g / avg;
      p = p - M(h.lr) * b;
    } else {
      p = p - M(h.lr) * g / avg;
    }
  }
};

}  // namespace fo
