// Not an optimizer: a bandwidth probe with an optimizer's memory pattern.
// It reads p, g and kStates state buffers and writes p and the states, with one
// add per buffer, so the drivers can measure the in-place streaming limit that
// an update rule with the same byte count can reach.
#pragma once
#include <type_traits>

#include "common.h"
#include "two_pass.h"

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
// The same with a two-pass rule's memory pattern (csrc/core/two_pass.h): a first pass
// that reads p, g and (ReadStates) the states and sums them per tensor, then Stream's
// in-place pass: the limit of LAMB (ReadStates) and LARS (p and g only).
struct StreamReduceHyper {
  FO_FIELDS(scale);
  FO_STEP_FIELDS(sum);
};

template <int NStates, bool ReadStates>
struct StreamReduce : NoStepScalars {
  using Hyper = StreamReduceHyper;
  static constexpr int kStates = NStates;
  static constexpr int kReduce = 1;
  static constexpr bool kReduceReadsStates = ReadStates;

  template <class M>
  FO_HD static Terms<1> reduce(const Hyper&, M p, M g, const M* s) {
    double t = double(p) + double(g);
    if constexpr (ReadStates)
      for (int k = 0; k < NStates; ++k) t += double(s[k]);
    return {{t}};
  }

  FO_HD static void finish(Hyper& h, const double* sums) { h.sum = sums[0]; }

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    Stream<NStates>::step(StreamHyper{h.scale}, p, g, s);
  }
};
template <int N, bool R>
struct IsStreamProbe<StreamReduce<N, R>> : std::true_type {};

}  // namespace fo
