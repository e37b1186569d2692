// Not an optimizer: a bandwidth probe with an optimizer's memory pattern.
// It reads p, g and kStates state buffers and writes p and the states, with one
// add per buffer, so the drivers can measure the in-place streaming limit that
// an update rule with the same byte count can reach.
#pragma once
#include <type_traits>

#include "common.h"

namespace fo {

struct StreamHyper {
  FO_FIELDS(scale);
};

template <int NStates>
struct Stream : NoStepScalars {
  using Hyper = StreamHyper;
  static constexpr int kStates = NStates;

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    const M c = M(h.scale) * g;
    for (int k = 0; k < NStates; ++k) s[k] = s[k] + c;
    p = p + c;
  }
};

// Whether a rule is a bandwidth probe (the drivers run it without decoding 8-bit state).
template <class Rule>
struct IsStreamProbe : std::false_type {};
template <int N>
struct IsStreamProbe<Stream<N>> : std::true_type {};

}  // namespace fo
