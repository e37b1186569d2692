// Adagrad (torch.optim.Adagrad). at_step fills the decayed rate
// clr = lr / (1 + (t - 1) lr_decay) from the step count t, once per call.
#pragma once
#include "common.h"

namespace fo {

struct AdagradHyper {
  FO_FIELDS(lr, lr_decay, eps, weight_decay, maximize);
  FO_STEP_FIELDS(clr);
};

struct Adagrad {
  using Hyper = AdagradHyper;
  static constexpr int kStates = 1;  // sum

  FO_HD static void at_step(Hyper& h, double t) { h.clr = h.lr / (1.0 + (t - 1.0) * h.lr_decay); }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = prepare_grad(g, p, h.maximize != 0.0, h.weight_decay);
    M& sum = s[0];
    sum = sum + g * g;
    p = p - M(h.clr) * g / (fo_sqrt(sum) + M(h.eps));
  }
};

}  // namespace fo
