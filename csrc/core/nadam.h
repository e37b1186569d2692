// NAdam (torch.optim.NAdam): Adam with Nesterov momentum under the momentum schedule
// mu_t = beta1 (1 - 0.5 * 0.96^(t psi)), with L2 or decoupled weight decay.
// State order: exp_avg, exp_avg_sq.
//
// Every per-step scalar comes from the host: the two step coefficients depend on the
// running product mu_1 ... mu_t (torch's per-param state "mu_product"), which the
// host keeps, in double, and folds in:
//   grad_coef    = lr (1 - mu_t) / (1 - mu_1...mu_t)
//   avg_coef     = lr mu_{t+1} / (1 - mu_1...mu_t mu_{t+1})
//   inv_bc2_sqrt = 1 / sqrt(1 - beta2^t)
// l2 and shrink select the decay as in Adam (adam.h).
#pragma once
#include "common.h"

namespace fo {

struct NadamHyper {
  FO_FIELDS(beta1, beta2, eps, l2, shrink, maximize, grad_coef, avg_coef, inv_bc2_sqrt);
};

struct Nadam : NoStepScalars {
  using Hyper = NadamHyper;
  static constexpr int kStates = 2;

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    p = p * M(h.shrink);
    g = prepare_grad(g, p, h.maximize != 0.0, h.l2);
    M& m = s[0];
    M& v = s[1];
    m = M(h.beta1) * m + M(1.0 - h.beta1) * g;
    v = M(h.beta2) * v + M(1.0 - h.beta2) * g * g;
    const M denom = fo_sqrt(v) * M(h.inv_bc2_sqrt) + M(h.eps);
    p = p - (M(h.grad_coef) * g + M(h.avg_coef) * m) / denom;
  }
};

}  // namespace fo
