// Adafactor (torch.optim.Adafactor): the per-element math of its factored second moment,
// which the factored drivers (csrc/cpu/factored.h, csrc/cuda/factored.cuh) run in three
// passes over a matrix's elements: row and column sums of g^2 (and the sum of p^2), the
// sum of the squared update, then the update itself.
//
// A tensor with two or more dimensions is a stack of m x n matrices (its last two
// dimensions): row factors r (one per row), column factors c (one per column), each
// moved toward the row and column means of g^2 by torch's lerp with weight t^beta2_decay;
// the second-moment estimate of element (i, j) is r_i c_j / max(mean_i r_i, eps1). A
// vector (or a 0-d tensor) keeps a full second moment v, moved the same way toward g^2.
// The update is u = g / sqrt(max(estimate, eps1^2)) (torch's rsqrt, then the product),
// and the step p = p (1 - lr wd) - alpha / max(1, RMS(u) / d) u with
// alpha = max(eps2, RMS(p)) min(lr, 1 / sqrt(t)), RMS(p) of the param before the step.
#pragma once
#include "common.h"

namespace fo {

// eps1: torch's eps[0] (the params' dtype's machine epsilon when None, filled by the
// host); the per-step scalars: beta2_weight = t^beta2_decay, rho = min(lr, 1 / sqrt(t)).
struct AdafactorHyper {
  FO_FIELDS(lr, beta2_decay, eps1, eps2, d, weight_decay, maximize);
  FO_STEP_FIELDS(beta2_weight, rho);
};

struct Adafactor {
  using Hyper = AdafactorHyper;
  static constexpr int kStates = 0;  // (the factors are not of the param's shape)

  FO_HD static void at_step(Hyper& h, double t) {
    h.beta2_weight = pow(t, h.beta2_decay);
    const double inv_sqrt = 1.0 / pow(t, 0.5);
    h.rho = h.lr < inv_sqrt ? h.lr : inv_sqrt;
  }

  // The gradient the rule sees (negated when maximizing).
  template <class M>
  FO_HD static M grad(const Hyper& h, M g) {
    return h.maximize != 0.0 ? -g : g;
  }

  // A factor (or a vector's second moment) moved toward its new mean: torch's lerp.
  template <class M>
  FO_HD static M moved(const Hyper& h, M factor, M mean) {
    return fo_lerp(factor, mean, M(h.beta2_weight));
  }

  // A row or column mean of g^2 as torch computes it from the sum of squares s:
  // norm, squared, divided by the count (each rounded in M).
  template <class M>
  FO_HD static M mean_square(double s, double count) {
    const M norm = M(sqrt(s));
    return norm * norm / M(count);
  }

  // The estimate of a factored element: (r c) / rbar.
  template <class M>
  FO_HD static M estimate(M r, M c, M rbar) {
    return r * c / rbar;
  }

  // The update of an element from its second-moment estimate.
  template <class M>
  FO_HD static M update(const Hyper& h, M g, M estimate) {
    const M floor = M(h.eps1 * h.eps1);
    const M clamped = estimate < floor ? floor : estimate;  // (NaN stays NaN)
    return M(1) / fo_sqrt(clamped) * g;
  }

  // The step of a param element: p (1 - lr wd), then + coef u with the tensor's
  // coef = -alpha / denom (torch's add with alpha: a fused multiply-add).
  template <class M>
  FO_HD static M step(M p, M u, M shrink, M coef) {
    return std::fma(coef, u, p * shrink);
  }
};

}  // namespace fo
