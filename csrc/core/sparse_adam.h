// SparseAdam (torch.optim.SparseAdam): Adam's moments and step on the rows a row-sparse
// gradient touches, in torch's order of operations, bit for bit:
//   m += (g - m) (1 - beta1);  v += (g^2 - v) (1 - beta2);
//   p += (-step_size) (m / (sqrt(v) + eps)),  step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t).
// (torch adds the updates to the old moments, and the old moments to the updates for the
// step; the sums are the same numbers.) The row drivers run it on the touched rows only
// (csrc/cpu/rows.h); the gradient of a row is the sum of its repeats (coalesced).
// State order: exp_avg, exp_avg_sq.
#pragma once
#include "common.h"

namespace fo {

struct SparseAdamHyper {
  FO_FIELDS(lr, beta1, beta2, eps, maximize);
  FO_STEP_FIELDS(neg_step_size);
};

struct SparseAdam {
  using Hyper = SparseAdamHyper;
  static constexpr int kStates = 2;

  FO_HD static void at_step(Hyper& h, double t) {
    const double bias_correction1 = 1.0 - pow(h.beta1, t);
    const double bias_correction2 = 1.0 - pow(h.beta2, t);
    h.neg_step_size = -(h.lr * sqrt(bias_correction2) / bias_correction1);
  }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = h.maximize != 0.0 ? -g : g;
    M& m = s[0];
    M& v = s[1];
    m = m + (g - m) * M(1.0 - h.beta1);
    v = v + (g * g - v) * M(1.0 - h.beta2);
    p = p + M(h.neg_step_size) * (m / (fo_sqrt(v) + M(h.eps)));
  }
};

}  // namespace fo
