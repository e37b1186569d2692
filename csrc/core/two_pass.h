// Rules that need per-tensor reductions before their update (trust ratios: LAMB, LARS).
//
// Such a rule runs in two passes over each call. The first reads every element (the
// parameter, the gradient, the states, nothing written) and sums per tensor the terms
// the rule asks for, deterministically (fixed blocks added in a fixed order); the
// second is the usual elementwise update, whose Hyper then carries per-tensor fields
// that the rule computed from its tensor's sums. Besides an elementwise rule's members
// (common.h), a two-pass rule declares
//
//   static constexpr int kReduce;   // number of per-tensor sums (e.g. 2: |p|^2, |u|^2)
//   static constexpr bool kReduceReadsStates;  // whether reduce reads the states (LAMB's
//                                             // moments) or only p and g (LARS); the
//                                             // first pass loads them only if so
//   template <class M>
//   FO_HD static Terms<kReduce> reduce(const Hyper&, M p, M g, const M* s);
//        // this element's kReduce terms, from the values before the step (returned by
//        // value: an array the rule wrote through a pointer would stay in memory, one
//        // per SIMD lane, and the drivers' loops would not vectorize)
//   FO_HD static void finish(Hyper&, const double* sums);
//        // the per-tensor fields of the Hyper (declared in FO_STEP_FIELDS, after the
//        // per-step ones at_step fills) from the tensor's kReduce sums
//
// Both drivers then run reduce over the call, add up the terms per tensor, call finish
// for each tensor (on the host on the CPU; on the GPU in the update's block setup,
// reading the sums from device memory, so nothing returns to the host), and run the
// update with each tensor's own Hyper. An elementwise rule has kReduce 0.
#pragma once

#include <type_traits>

#include "element.h"

namespace fo {

// The terms of one element, one per per-tensor sum.
template <int R>
struct Terms {
  double v[R];
};

template <class Rule, class = void>
struct ReduceCount : std::integral_constant<int, 0> {};
template <class Rule>
struct ReduceCount<Rule, std::void_t<decltype(Rule::kReduce)>>
    : std::integral_constant<int, Rule::kReduce> {};

// Number of per-tensor sums of a rule's first pass; 0 for an elementwise rule.
template <class Rule>
FO_HD constexpr int reduce_count() {
  return ReduceCount<Rule>::value;
}

// The slots the first pass reads: p, g, and the states if the rule's reduce uses them
// (the bytes per element of the first pass are this times the storage size).
template <class Rule>
FO_HD constexpr int reduce_slots() {
  if constexpr (ReduceCount<Rule>::value == 0) return 0;
  else return 2 + (Rule::kReduceReadsStates ? Rule::kStates : 0);
}

// One element of the first pass, for any storage layout: the rule's terms from the
// values the update would start from (the master copy where there is one). The states
// are read only where the rule's reduce uses them.
template <class Rule, class M, Extra X, class P, class S, class XS>
FO_HD Terms<Rule::kReduce> reduce_element(const typename Rule::Hyper& h, const P& p, M g,
                                          const S* s, const XS& x) {
  constexpr int NS = Rule::kStates > 0 ? Rule::kStates : 1;
  M sv[NS] = {};
  if constexpr (Rule::kReduceReadsStates)
    for (int k = 0; k < Rule::kStates; ++k) sv[k] = load<M>(s[k]);
  const M pv = X == Extra::Master ? load<M>(x) : load<M>(p);
  return Rule::template reduce<M>(h, pv, g, sv);
}

// The trust ratio of LAMB and LARS (optax's scale_by_trust_ratio): coefficient *
// |p| / (|u| + eps) from the sums of squares, and 1 where either norm is 0.
FO_HD double trust_ratio(double sumsq_p, double sumsq_u, double coefficient, double eps) {
  const double pn = sqrt(sumsq_p), un = sqrt(sumsq_u);
  return pn == 0.0 || un == 0.0 ? 1.0 : coefficient * pn / (un + eps);
}

}  // namespace fo
