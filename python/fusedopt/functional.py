"""In-place, multi-tensor optimizer steps: one kernel call per (device, dtype) per step.

One op per algorithm of the table (`fusedopt.algorithms`), named after it with a
trailing underscore (``adam_``, ``sgd_``, ...): it updates `params` and the state lists
in place, with torch.optim's equations. Every op also takes the mixed-precision and
gradient-check keywords (`master_params`, `kahan_buffers`, `stochastic_rounding`,
`seed`, `loss_scale`, `max_grad_norm`, `skip_nonfinite`, `l1`, and `absmax`: the block
scales of 8-bit states, whose arrays then hold uint8 codes); with `max_grad_norm` or
`skip_nonfinite` it returns a StepInfo(skipped, grad_norm), on a GPU a DeviceStepInfo
(the checks and the skip stay on the device). Hyperparameters are plain Python numbers;
per-step scalars (bias corrections, decayed rates) are computed once per call, in
double precision.
"""

from __future__ import annotations

from . import _arrays, _cpu, _engine
from .algorithms import SPECS

__all__ = [spec.op_name for spec in SPECS.values()] + ["axpy_", "dot"]

for _spec in SPECS.values():
    globals()[_spec.op_name] = _engine.functional_op(_spec)
del _spec



def axpy_(ys: list, xs: list, alpha: float, *, stream=None) -> None:
    """``ys[j] += alpha * xs[j]`` for every j, in place.

    The plain SGD kernel with ``lr = -alpha``, which computes exactly ``y + alpha * x``.

    Parameters
    ----------
    ys : list of arrays
        Updated in place.
    xs : list of arrays
        Aligned with `ys`; only read.
    alpha : float
        The factor.
    stream : CUDA stream or int or None, default None
        GPU arrays: the stream the kernels run on.
    """
    spec = SPECS["sgd"]
    kw = dict(lr=-alpha, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, first_step=False)
    _engine.plan(spec, kw, ys, xs, [], stream=stream, op="axpy_").run()


def dot(xs: list, ys: list) -> float:
    """Sum over j of the dot product of ``xs[j]`` and ``ys[j]``, accumulated in double.

    On the CPU the result is the same for every thread count (fixed blocks, summed in
    order).

    Parameters
    ----------
    xs, ys : list of arrays
        Aligned lists of arrays of the same shapes and dtypes.

    Returns
    -------
    float
    """
    prep = _arrays.prepare("dot", xs, ys, [], [], read_only=True)
    if prep.device != _arrays.CPU:
        return float(sum(_device_dot(x, y) for x, y in zip(xs, ys)))
    return sum(_cpu.dot(dtype, ptrs, sizes) for dtype, ptrs, sizes in prep.groups)




def _device_dot(x, y):
    """x . y of two GPU arrays (CuPy, torch), accumulated in float64."""
    if type(x).__module__.startswith("torch"):
        import torch

        return float((x.reshape(-1) * y.reshape(-1)).sum(dtype=torch.float64))
    return float((x.ravel() * y.ravel()).sum(dtype="float64"))
