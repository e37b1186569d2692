// The EMA of the params on its own (torch.optim.swa_utils' EMA update), for the params
// a step does not update: the param slot holds the average, the gradient slot the
// params (read only), so `p` below is the average and `g` the param. The update
// kernels fold the same ema_lerp into their pass through the EMA slot of a layout
// (element.h); this rule serves the params without a gradient in that step.
#pragma once
#include "common.h"

namespace fo {

// decay 0: a copy of the params (AveragedModel's first update).
struct EmaHyper {
  FO_FIELDS(decay);
};

struct Ema : NoStepScalars {
  using Hyper = EmaHyper;
  static constexpr int kStates = 0;

  template <class M>
  FO_HD static void step(const Hyper& h, M& p, M g, M*) {
    const M moved = ema_lerp(p, g, h.decay);
    p = h.decay == 0.0 ? g : moved;
  }
};

}  // namespace fo
