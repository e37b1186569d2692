// One element of a step, for any storage layout: what both drivers call per element.
//
// A layout names the storage type of the parameter P (and of the gradient, which
// has the parameter's type), of the state buffers S, and an optional extra buffer:
//   Extra::None    the rule updates the parameter's own value;
//   Extra::Master  a float32 master copy is updated and the parameter receives its
//                  rounded value in the same pass;
//   Extra::Kahan   a compensation buffer (type P) carries what rounding the
//                  parameter to 16 bits lost, and adds it back on the next step.
// Apart from the extra buffer, a layout may carry an EMA slot (E, type P): an
// exponential moving average of the parameter, moved toward the parameter's new
// (stored) value in the same pass (ema_update).
// The math type M is float for 16-bit and float32 storage, double for float64.
#pragma once

#include <cstdint>

#include "precision.h"

namespace fo {

enum class Extra { None, Master, Kahan };

template <Extra X, class P>
struct ExtraStorage {
  using type = P;  // Kahan: the compensation has the parameter's type; None: unused
};
template <class P>
struct ExtraStorage<Extra::Master, P> {
  using type = float;
};

// Per-call settings of the driver, the same for every rule.
struct Mode {
  double grad_scale;   // gradients are multiplied by this (1 / loss scale x clip coefficient)
  double stochastic;   // 1: the parameter is written back with stochastic rounding
  std::uint64_t key;   // random stream of this call: a hash of (seed, step)
  double step;         // the step count t after this update (the rules' at_step)
  double l1 = 0.0;     // L1 proximal step after the rule: p = sign(p) max(|p| - l1, 0)
  double ema_decay = 0.0;  // layouts with an EMA slot: its decay (0: copy the params)
  // 8-bit state (layouts.h's Int8Block): bit k set when state k is never negative and
  // uses the unsigned code table (quant8.h), clear for the signed one
  std::uint32_t unsigned_states = 0;
};

// The EMA slot's new value after the param was stored as `p`: the stored param when
// the decay is 0 (AveragedModel's first update copies), else ema_lerp (common.h),
// rounded to nearest as a param. (The select is on math values: the loop vectorizes.)
template <class M, class P>
FO_HD P ema_update(P e, P p, double decay) {
  const M pv = load<M>(p);
  const M moved = ema_lerp(load<M>(e), pv, decay);
  return Store<P>::template apply<false>(decay == 0.0 ? pv : moved, 0);
}

// The L1 proximal (soft-threshold) step. With a threshold of 0 it is exactly the
// identity (signed zeros, infinities and NaN included), so it runs unconditionally:
// a select around it would hide its comparisons behind a branch that the compiler
// cannot if-convert, and the loop would not vectorize.
template <class M>
FO_HD M soft_threshold(M p, M threshold) {
  const M a = std::fabs(p) - threshold;
  return std::copysign(a <= M(0) ? M(0) : a, p);
}

// SR: the parameter is written back with stochastic rounding (random bits `rnd`).
// E: `e` is the EMA slot, moved toward the stored parameter afterwards.
template <class Rule, class M, Extra X, bool SR, bool E = false, class P, class S, class XS>
FO_HD void update_element_as(const typename Rule::Hyper& h, const Mode& mode, std::uint32_t rnd,
                             P& p, M g, S* s, XS& x, P& e) {
  constexpr int NS = Rule::kStates > 0 ? Rule::kStates : 1;
  M sv[NS];
  for (int k = 0; k < Rule::kStates; ++k) sv[k] = load<M>(s[k]);
  const M old = X == Extra::Master ? load<M>(x) : load<M>(p);
  M pv = old;
  Rule::template step<M>(h, pv, g, sv);
  pv = soft_threshold(pv, M(mode.l1));
  for (int k = 0; k < Rule::kStates; ++k) s[k] = Store<S>::template apply<false>(sv[k], 0);
  if constexpr (X == Extra::Master) {
    x = float(pv);
    p = Store<P>::template apply<SR>(pv, rnd);
  } else if constexpr (X == Extra::Kahan) {
    // compensated write-back: the exact update plus what earlier roundings dropped
    const M y = (pv - old) + load<M>(x);
    const P t = Store<P>::template apply<SR>(old + y, rnd);
    x = Store<P>::template apply<false>(y - (load<M>(t) - old), 0);
    p = t;
  } else {
    p = Store<P>::template apply<SR>(pv, rnd);
  }
  if constexpr (E) e = ema_update<M>(e, p, mode.ema_decay);
}

// The same with the rounding chosen at run time by mode.stochastic.
template <class Rule, class M, Extra X, bool E = false, class P, class S, class XS>
FO_HD void update_element(const typename Rule::Hyper& h, const Mode& mode, std::uint32_t rnd,
                          P& p, M g, S* s, XS& x, P& e) {
  if (mode.stochastic != 0.0)
    update_element_as<Rule, M, X, true, E>(h, mode, rnd, p, g, s, x, e);
  else
    update_element_as<Rule, M, X, false, E>(h, mode, rnd, p, g, s, x, e);
}

}  // namespace fo
