// Muon (torch.optim.Muon): the two elementwise passes around its Newton-Schulz
// iterations (which run as batched matrix products, python/fusedopt/_muon.py).
//
// MuonMomentum: the momentum and the matrix the iterations start from, torch's lerps bit
// for bit: b = lerp(b, g, 1 - mu); u = lerp(g, b, mu) (Nesterov) or u = b. The param
// slot holds u (the pass's output: its old value is not used), the state the momentum
// buffer b.
// MuonUpdate: p = p (1 - lr wd), then p += -lr' o, with o the orthogonalized update
// (the gradient slot) and lr' the learning rate adjusted to the param's shape; torch's
// add with alpha is a fused multiply-add in its vector kernel, and so it is here.
#pragma once
#include "common.h"

namespace fo {

struct MuonMomentumHyper {
  FO_FIELDS(momentum, nesterov);
};

struct MuonMomentum : NoStepScalars {
  using Hyper = MuonMomentumHyper;
  static constexpr int kStates = 1;  // momentum_buffer

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    M& b = s[0];
    b = fo_lerp(b, g, M(1.0 - h.momentum));
    const M nesterov = fo_lerp(g, b, M(h.momentum));
    p = h.nesterov != 0.0 ? nesterov : b;
  }
};

// shrink = 1 - lr * weight_decay; lr: the adjusted learning rate of the param's shape.
struct MuonUpdateHyper {
  FO_FIELDS(shrink, lr);
};

struct MuonUpdate : NoStepScalars {
  using Hyper = MuonUpdateHyper;
  static constexpr int kStates = 0;

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M*) {
    p = p * M(h.shrink);
    p = std::fma(M(-h.lr), g, p);
  }
};

}  // namespace fo
