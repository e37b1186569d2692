// RAdam (torch.optim.RAdam; Liu et al., 2020): Adam whose adaptive step is switched
// on, and rectified, once the variance of the adaptive rate is tractable; before that
// the step is SGD with momentum. L2 or decoupled weight decay, as Adam (adam.h).
// State order: exp_avg, exp_avg_sq.
//
// at_step fills the per-step scalars from the step count t, once per call in double,
// in torch's order of operations, so that the switch falls on the same step:
//   rho_inf = 2 / (1 - beta2) - 1,   rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
//   rho_t > 5: adaptive = lr r_t sqrt(1 - beta2^t) / (1 - beta1^t), with
//              r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
//   otherwise: plain = lr / (1 - beta1^t)
// The switch is one select per element on a per-step flag: both sides are computed,
// so that the loop vectorizes; the side not taken is discarded (even where v = eps = 0
// made it 0 / 0).
#pragma once
#include "common.h"

namespace fo {

struct RadamHyper {
  FO_FIELDS(lr, beta1, beta2, eps, l2, shrink, maximize);
  FO_STEP_FIELDS(rectified, adaptive, plain);
};

struct Radam {
  using Hyper = RadamHyper;
  static constexpr int kStates = 2;

  FO_HD static void at_step(Hyper& h, double t) {
    const double bc1 = 1.0 - pow(h.beta1, t);
    const double bc2 = 1.0 - pow(h.beta2, t);
    const double rho_inf = 2.0 / (1.0 - h.beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * t * pow(h.beta2, t) / bc2;
    if (rho_t > 5.0) {
      const double rect = sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                               ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t));
      h.rectified = 1.0;
      h.adaptive = h.lr * rect * sqrt(bc2) / bc1;
      h.plain = 0.0;
    } else {
      h.rectified = 0.0;
      h.adaptive = 0.0;
      h.plain = h.lr / bc1;
    }
  }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    p = p * M(h.shrink);
    g = prepare_grad(g, p, h.maximize != 0.0, h.l2);
    M& m = s[0];
    M& v = s[1];
    m = M(h.beta1) * m + M(1.0 - h.beta1) * g;
    v = M(h.beta2) * v + M(1.0 - h.beta2) * g * g;
    const M adaptive = M(h.adaptive) / (fo_sqrt(v) + M(h.eps));
    const M scale = h.rectified != 0.0 ? adaptive : M(h.plain);
    p = p - scale * m;
  }
};

}  // namespace fo
