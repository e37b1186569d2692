"""The EMA of the params that any optimizer can keep (``ema_decay=``): what
torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn(decay) computes when its
``update_parameters`` follows every step, folded into the step.

Each param's average lives in its state as ``state["ema"]`` (the param's dtype and
shape). The update kernels move it toward the param's new value in the same pass as the
step (the EMA slot of a layout: one more read and write per element, instead of a second
pass over the params): ``ema = torch.lerp(ema, p, 1 - decay)``, bit for bit as torch
computes it. As AveragedModel, the first update copies the params (decay 0 for that
step), and every later update moves every average, also those of the params that had no
gradient in the step (a pass of the EMA rule over those only). A param that never had a
state has no average yet: its average is the param itself until its first step.
"""

from __future__ import annotations

from . import _engine
from .algorithms._spec import Spec


class EmaSpec(Spec):
    """The EMA rule on its own (csrc/core/ema.h): the averages are the rule's params, the
    model's params its gradients (only read)."""

    name, title = "ema", "EMA"
    scalars = ()

    def hyper(self, kw):
        return {"decay": kw["decay"]}


EMA = EmaSpec()


def plan(emas, params, decay, *, op="ema", stream=None):
    """The validated plan that moves `emas` toward `params` (decay 0: copies)."""
    return _engine.plan(EMA, {"decay": float(decay)}, emas, params, [], op=op, stream=stream)


def swap(pairs):
    """Exchange the values of each (param, average) pair in place."""
    for p, e in pairs:
        saved = p.copy() if hasattr(p, "copy") else p.clone()
        p[...] = e
        e[...] = saved
