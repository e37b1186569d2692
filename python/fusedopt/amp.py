"""Dynamic loss scaling on top of the fused non-finite check.

::

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
from typing import Any, Sequence

__all__ = ["DynamicLossScaler"]


def __dir__():
    return sorted(__all__)


class DynamicLossScaler:
    """Dynamic loss scaling for 16-bit training, with torch's GradScaler schedule.

    Multiply the loss by `get_scale` before backpropagation (`scale` does it); `step`
    then hands the scale to the optimizer's fused step, which divides the gradients by
    it, skips the whole step if any gradient is inf or NaN (nothing changes), clips to
    a global norm if asked, and updates, in one or two passes over the gradients.
    After a skipped step the scale is multiplied by `backoff_factor`; after
    `growth_interval` good steps in a row, by `growth_factor`.

    Parameters
    ----------
    init_scale : float, default 2.0**16
        The first scale, positive and finite.
    growth_factor : float, default 2.0
        The factor after `growth_interval` good steps, > 1.
    backoff_factor : float, default 0.5
        The factor after a step with non-finite gradients, in (0, 1).
    growth_interval : int, default 2000
        Good steps in a row before the scale grows, a positive integer.
    enabled : bool, default True
        False makes the scale 1 and `step` a plain checked step.

    Attributes
    ----------
    scale_value : float
        The current scale (once the last step's outcome has been read).
    growth_tracker : int
        Good steps since the last change of the scale.

    Raises
    ------
    ValueError
        On an argument out of its range.

    Examples
    --------
    >>> import numpy as np, fusedopt as fo
    >>> params = [np.zeros(3, np.float32)]
    >>> opt = fo.Adam(params, lr=1e-3)
    >>> scaler = fo.amp.DynamicLossScaler(init_scale=1024.0)
    >>> scaled_grads = [np.full(3, np.inf, np.float32)]   # from the scaled loss
    >>> scaler.step(opt, scaled_grads).skipped
    True
    >>> scaler.get_scale()
    512.0
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True) -> None:
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

    def get_scale(self) -> float:
        """Return the current scale (1.0 when disabled).

        On the GPU this first reads the outcome of the last step (skipped or not),
        which waits for that step's gradient pass only.

        Returns
        -------
        float
            The factor to multiply the loss by.
        """
        self._settle()
        return self.scale_value if self.enabled else 1.0

    def _settle(self):
        info, self._pending = self._pending, None
        if info is not None:
            self.update(info.skipped)

    def scale(self, loss: Any) -> Any:
        """Return the loss multiplied by the current scale (backpropagate this one).

        Parameters
        ----------
        loss : float or array
            The unscaled loss.

        Returns
        -------
        float or array
            ``loss * get_scale()``.
        """
        return loss * self.get_scale()

    def step(self, optimizer: Any, grads: Sequence[Any], *,
             max_grad_norm: float | None = None) -> Any:
        """Unscale, check, clip and update in the optimizer's fused step; update the scale.

        Parameters
        ----------
        optimizer : Optimizer
            A fusedopt optimizer whose ``step`` takes ``loss_scale``,
            ``skip_nonfinite`` and ``max_grad_norm``.
        grads : sequence of arrays
            The gradients of the scaled loss, aligned with the optimizer's params.
        max_grad_norm : float, optional
            Clip the unscaled gradients to this global L2 norm.

        Returns
        -------
        StepInfo or DeviceStepInfo
            What the step found: ``skipped`` (a gradient was inf or NaN, nothing
            changed) and ``grad_norm`` (of the unscaled gradients).
        """
        info = optimizer.step(grads, loss_scale=self.get_scale(), skip_nonfinite=True,
                              max_grad_norm=max_grad_norm)
        if self.enabled:
            self._pending = info  # read on the next get_scale (at once on the CPU)
            if isinstance(info, tuple):
                self._settle()
        return info

    def update(self, found_inf: bool) -> None:
        """Advance the schedule by one step (`step` calls this).

        Parameters
        ----------
        found_inf : bool
            Whether the step found inf or NaN gradients: the scale backs off;
            otherwise it counts a good step and grows after `growth_interval` of them.
        """
        if found_inf:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self) -> dict[str, float | int]:
        """Return the scaler's state: scale, factors, interval and good-step count.

        Returns
        -------
        dict
            Keys ``scale``, ``growth_factor``, ``backoff_factor``, ``growth_interval``,
            ``growth_tracker``.
        """
        self._settle()
        return {"scale": self.scale_value, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore a state returned by `state_dict`.

        Parameters
        ----------
        state : dict
            As returned by `state_dict`.
        """
        self._pending = None
        self.scale_value = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.growth_tracker = int(state["growth_tracker"])
