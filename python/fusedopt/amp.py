"""Dynamic loss scaling on top of the fused non-finite check.

    scaler = fo.amp.DynamicLossScaler()
    loss = scaler.scale(loss)          # backpropagate the scaled loss
    info = scaler.step(opt, grads)     # unscale, check, (clip), update, all fused
    # info.skipped: the step found inf/NaN and changed nothing; the scale backed off

The schedule is torch.cuda.amp.GradScaler's: the scale is multiplied by
`backoff_factor` after a step with non-finite gradients, and by `growth_factor`
after `growth_interval` consecutive good steps.

On the GPU the step's outcome stays on the device (the kernels skip there); the
scaler reads it when the next scale is asked for (`get_scale`, `scale`), which in a
training loop comes after the next forward pass has been enqueued.
"""

from __future__ import annotations

import math


class DynamicLossScaler:
    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval > 0):
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval}")
        self.scale_value = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.enabled = enabled
        self.growth_tracker = 0
        self._pending = None  # the StepInfo of the last step, not yet read

    def get_scale(self):
        self._settle()
        return self.scale_value if self.enabled else 1.0

    def _settle(self):
        info, self._pending = self._pending, None
        if info is not None:
            self.update(info.skipped)

    def scale(self, loss):
        """The loss multiplied by the current scale (backpropagate this one)."""
        return loss * self.get_scale()

    def step(self, optimizer, grads, *, max_grad_norm=None):
        """Unscale the gradients, skip the step if any is inf or NaN, clip if asked, and
        update the scale; returns the optimizer's StepInfo."""
        info = optimizer.step(grads, loss_scale=self.get_scale(), skip_nonfinite=True,
                              max_grad_norm=max_grad_norm)
        if self.enabled:
            self._pending = info  # read on the next get_scale (at once on the CPU)
            if isinstance(info, tuple):
                self._settle()
        return info

    def update(self, found_inf):
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self):
        self._settle()
        return {"scale": self.scale_value, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state):
        self._pending = None
        self.scale_value = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.growth_tracker = int(state["growth_tracker"])
