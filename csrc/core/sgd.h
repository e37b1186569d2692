// SGD with optional momentum, dampening and Nesterov (torch.optim.SGD).
#pragma once
#include "common.h"

namespace fo {

// first_step: 1 when the momentum buffer is created by this step.
struct SgdHyper {
  FO_FIELDS(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
};

template <bool Momentum>
struct Sgd : NoStepScalars {
  using Hyper = SgdHyper;
  static constexpr int kStates = Momentum ? 1 : 0;  // momentum_buffer

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = prepare_grad(g, p, h.maximize != 0.0, h.weight_decay);
    if constexpr (Momentum) {
      M& b = s[0];
      b = h.first_step != 0.0 ? g : M(h.momentum) * b + M(1.0 - h.dampening) * g;
      g = h.nesterov != 0.0 ? g + M(h.momentum) * b : b;
    }
    p = p - M(h.lr) * g;
  }
};

}  // namespace fo
