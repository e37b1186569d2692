// Adam and AdamW (torch.optim.Adam / AdamW): one rule, the decay mode is a flag.
// State order: exp_avg, exp_avg_sq, then max_exp_avg_sq if Amsgrad.
// at_step fills the per-step scalars from the step count t (once per call, in double):
// step_size = lr / (1 - beta1^t), inv_bc2_sqrt = 1 / sqrt(1 - beta2^t).
#pragma once
#include "common.h"

namespace fo {

// l2: weight_decay for Adam, 0 for AdamW; shrink: 1 - lr * weight_decay for AdamW,
// exactly 1 for Adam.
struct AdamHyper {
  FO_FIELDS(lr, beta1, beta2, eps, l2, shrink, maximize);
  FO_STEP_FIELDS(step_size, inv_bc2_sqrt);
};

template <bool Amsgrad>
struct Adam {
  using Hyper = AdamHyper;
  static constexpr int kStates = Amsgrad ? 3 : 2;

  FO_HD static void at_step(Hyper& h, double t) {
    h.step_size = h.lr / (1.0 - pow(h.beta1, t));
    h.inv_bc2_sqrt = 1.0 / sqrt(1.0 - pow(h.beta2, t));
  }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    p = p * M(h.shrink);
    g = prepare_grad(g, p, h.maximize != 0.0, h.l2);
    M& m = s[0];
    M& v = s[1];
    m = M(h.beta1) * m + M(1.0 - h.beta1) * g;
    v = M(h.beta2) * v + M(1.0 - h.beta2) * g * g;
    M vhat = v;
    if constexpr (Amsgrad) {
      M& vmax = s[2];
      vmax = vmax > v ? vmax : v;
      vhat = vmax;
    }
    const M denom = fo_sqrt(vhat) * M(h.inv_bc2_sqrt) + M(h.eps);
    p = p - M(h.step_size) * m / denom;
  }
};

}  // namespace fo
