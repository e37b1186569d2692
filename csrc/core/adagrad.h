// Adagrad (torch.optim.Adagrad). The decayed rate clr = lr / (1 + (t-1) lr_decay)
// is computed on the host per call.
#pragma once
#include "common.h"

namespace fo {

struct AdagradHyper {
  double clr, eps, weight_decay, maximize;
};

struct Adagrad {
  using Hyper = AdagradHyper;
  static constexpr int kStates = 1;  // sum

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = prepare_grad(g, p, h.maximize != 0.0, h.weight_decay);
    M& sum = s[0];
    sum = sum + g * g;
    p = p - M(h.clr) * g / (fo_sqrt(sum) + M(h.eps));
  }
};

}  // namespace fo
