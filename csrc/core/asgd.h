// ASGD (torch.optim.ASGD): SGD with a decaying rate, and the running average of the
// iterates in the state. State order: ax.
//
// The per-step scalars are per-param state in torch ("eta", "mu"), which the host
// keeps and passes: eta, the rate of this step, with decay = 1 - lambd eta (computed
// on the host in double, as torch); mu, the averaging coefficient, with average = 0
// when mu is exactly 1, where torch copies the param into ax instead of averaging.
#pragma once
#include "common.h"

namespace fo {

struct AsgdHyper {
  FO_FIELDS(eta, decay, mu, average, weight_decay, maximize);
};

struct Asgd : NoStepScalars {
  using Hyper = AsgdHyper;
  static constexpr int kStates = 1;

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = prepare_grad(g, p, h.maximize != 0.0, h.weight_decay);
    p = p * M(h.decay);
    p = p - M(h.eta) * g;
    M& ax = s[0];
    const M averaged = ax + (p - ax) * M(h.mu);
    ax = h.average != 0.0 ? averaged : p;
  }
};

}  // namespace fo
