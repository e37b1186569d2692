// Adamax (torch.optim.Adamax): Adam with the infinity norm in place of the second
// moment. State order: exp_avg, exp_inf. at_step fills clr = lr / (1 - beta1^t) from
// the step count t, once per call.
#pragma once
#include "common.h"

namespace fo {

struct AdamaxHyper {
  FO_FIELDS(lr, beta1, beta2, eps, weight_decay, maximize);
  FO_STEP_FIELDS(clr);
};

struct Adamax {
  using Hyper = AdamaxHyper;
  static constexpr int kStates = 2;

  FO_HD static void at_step(Hyper& h, double t) { h.clr = h.lr / (1.0 - pow(h.beta1, t)); }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = prepare_grad(g, p, h.maximize != 0.0, h.weight_decay);
    M& m = s[0];
    M& u = s[1];
    m = M(h.beta1) * m + M(1.0 - h.beta1) * g;
    // u = max(beta2 u, |g| + eps), NaN from either side kept (torch.maximum)
    const M decayed = M(h.beta2) * u;
    const M bound = std::fabs(g) + M(h.eps);
    u = (decayed > bound || decayed != decayed) ? decayed : bound;
    p = p - M(h.clr) * m / u;
  }
};

}  // namespace fo
