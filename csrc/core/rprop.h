// Rprop (torch.optim.Rprop): per-element step sizes that grow by etaplus while the
// gradient keeps its sign and shrink by etaminus when it flips, within
// [step_size_min, step_size_max]; the param moves by its step size against the sign
// of the gradient. Where the sign flipped, the gradient counts as 0: no move, and 0
// kept as the previous gradient (so the next step neither grows nor shrinks).
// State order: prev (the previous gradient, as torch keeps it), step_size.
//
// Signs as torch.sign: NaN has sign 0, so a NaN gradient leaves the param and its step
// size as they are (and is kept as prev). The step size is clamped as torch.clamp: a
// NaN stays NaN, and step_size_min > step_size_max gives step_size_max.
#pragma once
#include "common.h"

namespace fo {

struct RpropHyper {
  FO_FIELDS(etaminus, etaplus, step_size_min, step_size_max, maximize);
};

struct Rprop : NoStepScalars {
  using Hyper = RpropHyper;
  static constexpr int kStates = 2;

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M* s) {
    g = h.maximize != 0.0 ? -g : g;
    M& prev = s[0];
    M& size = s[1];
    const M product = g * prev;
    const bool flipped = product < M(0);
    const M factor = product > M(0) ? M(h.etaplus) : flipped ? M(h.etaminus) : M(1);
    M next = size * factor;
    next = next < M(h.step_size_min) ? M(h.step_size_min) : next;
    next = next > M(h.step_size_max) ? M(h.step_size_max) : next;
    size = next;
    g = flipped ? M(0) : g;
    const M sign = g > M(0) ? M(1) : g < M(0) ? M(-1) : M(0);
    p = p - sign * size;
    prev = g;
  }
};

}  // namespace fo
