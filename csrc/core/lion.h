// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"). One state:
// exp_avg (m).
//   c = beta1 m + (1 - beta1) g;  p <- p - lr (sign(c) + wd p);  m <- beta2 m + (1 - beta2) g
// sign(0) is 0 and sign(NaN) NaN, as torch.sign and numpy.sign give them. c is computed
// in double whatever the storage: its sign decides a whole step of lr, and in double it
// is exactly the float64 reference's (the same three operations on the same values)
// instead of flipping where float32 rounding would move a tiny c across zero.
#pragma once
#include "common.h"

namespace fo {

struct LionHyper {
  FO_FIELDS(lr, beta1, beta2, weight_decay, maximize);
};

// sign(x) with sign(+-0) = +-0 and sign(NaN) = NaN: two selects, no branch.
template <class M>
FO_HD M sign_of(M x) {
  return x > M(0) ? M(1) : x < M(0) ? M(-1) : x;
}

struct Lion : NoStepScalars {
  using Hyper = LionHyper;
  static constexpr int kStates = 1;  // exp_avg

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = h.maximize != 0.0 ? -g : g;
    M& m = s[0];
    const double c = h.beta1 * double(m) + (1.0 - h.beta1) * double(g);
    p = p - M(h.lr) * (M(sign_of(c)) + M(h.weight_decay) * p);
    m = M(h.beta2) * m + M(1.0 - h.beta2) * g;
  }
};

}  // namespace fo
