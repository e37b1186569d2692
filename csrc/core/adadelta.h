// Adadelta (torch.optim.Adadelta). State order: square_avg, acc_delta.
#pragma once
#include "common.h"

namespace fo {

struct AdadeltaHyper {
  FO_FIELDS(lr, rho, eps, weight_decay, maximize);
};

struct Adadelta : NoStepScalars {
  using Hyper = AdadeltaHyper;
  static constexpr int kStates = 2;

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = prepare_grad(g, p, h.maximize != 0.0, h.weight_decay);
    const M rho = M(h.rho), one_minus_rho = M(1.0 - h.rho), eps = M(h.eps);
    M& v = s[0];
    M& u = s[1];
    v = rho * v + one_minus_rho * g * g;
    const M delta = fo_sqrt(u + eps) / fo_sqrt(v + eps) * g;
    u = rho * u + one_minus_rho * delta * delta;
    p = p - M(h.lr) * delta;
  }
};

}  // namespace fo
