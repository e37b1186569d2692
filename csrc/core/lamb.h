// LAMB (You et al. 2020), with optax.lamb's equations: Adam's bias-corrected direction
// plus weight decay, scaled per tensor by the trust ratio |p| / |u| (1 where either
// norm is 0). A two-pass rule (two_pass.h): the first pass sums p^2 and u^2 per tensor.
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd p;
//   p <- p - lr ratio u.
// State order: exp_avg, exp_avg_sq.
#pragma once
#include "common.h"
#include "two_pass.h"

namespace fo {

// at_step fills inv_bc1 = 1 / (1 - b1^t), inv_bc2 = 1 / (1 - b2^t); finish the
// tensor's step factor lr * ratio.
struct LambHyper {
  FO_FIELDS(lr, beta1, beta2, eps, weight_decay);
  FO_STEP_FIELDS(inv_bc1, inv_bc2, lr_ratio);
};

struct Lamb {
  using Hyper = LambHyper;
  static constexpr int kStates = 2;
  static constexpr int kReduce = 2;  // sum p^2, sum u^2
  static constexpr bool kReduceReadsStates = true;

  FO_HD static void at_step(Hyper& h, double t) {
    h.inv_bc1 = 1.0 / (1.0 - pow(h.beta1, t));
    h.inv_bc2 = 1.0 / (1.0 - pow(h.beta2, t));
  }

  // The moments after this step and the direction u.
  template <class M>
  FO_HD static M direction(const Hyper& h, M p, M g, M& m, M& v) {
    m = M(h.beta1) * m + M(1.0 - h.beta1) * g;
    v = M(h.beta2) * v + M(1.0 - h.beta2) * g * g;
    const M u = m * M(h.inv_bc1) / (fo_sqrt(v * M(h.inv_bc2)) + M(h.eps));
    return h.weight_decay != 0.0 ? u + M(h.weight_decay) * p : u;
  }

  template <class M>
  FO_HD static Terms<2> reduce(const Hyper& h, M p, M g, const M* s) {
    M m = s[0], v = s[1];
    const double u = double(direction(h, p, g, m, v)), pd = double(p);
    return {{pd * pd, u * u}};
  }

  FO_HD static void finish(Hyper& h, const double* sums) {
    h.lr_ratio = h.lr * trust_ratio(sums[0], sums[1], 1.0, 0.0);
  }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    const M u = direction(h, p, g, s[0], s[1]);
    p = p - M(h.lr_ratio) * u;
  }
};

}  // namespace fo
