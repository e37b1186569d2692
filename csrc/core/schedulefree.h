// Schedule-free AdamW (Defazio et al. 2024), as the schedulefree package's
// AdamWScheduleFree steps: the parameter holds the interpolation y between the
// average x and the base sequence z, and one pass updates y, z and the second moment.
//   v = b2 v + (1 - b2) g^2;  u = g / (sqrt(v / (1 - b2^t)) + eps) (+ wd y), with the
//   division by 1 - b2^t a multiplication by its reciprocal;
//   y <- lerp(y, z, ckp1);  y <- y + lr (b1 (1 - ckp1) - 1) u;  z <- z - lr u.
// lerp is torch's: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w). ckp1, the
// weight of this step in the average, and the scheduled lr come from the host's
// per-group bookkeeping (warmup, lr_max, weight_sum). State order: z, exp_avg_sq.
#pragma once
#include "common.h"

namespace fo {

// y_coef = lr * (beta1 * (1 - ckp1) - 1), computed on the host in double; at_step
// fills inv_bc2 = 1 / (1 - beta2^t).
struct AdamwScheduleFreeHyper {
  FO_FIELDS(lr, beta1, beta2, eps, weight_decay, ckp1, y_coef);
  FO_STEP_FIELDS(inv_bc2);
};

// torch.lerp's formula, exact at both ends: a + w (b - a) for |w| < 0.5, else
// b - (b - a)(1 - w), which is b + (1 - w)(a - b) bit for bit. w is the same for every
// element: the arm is a choice of operands, so one arm is computed, not both.
template <class M>
FO_HD M torch_lerp(M a, M b, double w) {
  const bool near_a = std::fabs(w) < 0.5;
  const M from = near_a ? a : b, to = near_a ? b : a;
  return from + M(near_a ? w : 1.0 - w) * (to - from);
}

struct AdamwScheduleFree {
  using Hyper = AdamwScheduleFreeHyper;
  static constexpr int kStates = 2;  // z, exp_avg_sq

  FO_HD static void at_step(Hyper& h, double t) { h.inv_bc2 = 1.0 / (1.0 - pow(h.beta2, t)); }

  template <class M>
  FO_HD static void step(const Hyper& h, M& y, M g, M* s) {
    M& z = s[0];
    M& v = s[1];
    v = M(h.beta2) * v + M(1.0 - h.beta2) * (g * g);
    const M denom = fo_sqrt(v * M(h.inv_bc2)) + M(h.eps);
    M u = g / denom;
    u = h.weight_decay != 0.0 ? u + M(h.weight_decay) * y : u;
    y = torch_lerp(y, z, h.ckp1);
    y = y + M(h.y_coef) * u;
    z = z - M(h.lr) * u;
  }
};

}  // namespace fo
