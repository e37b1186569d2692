"""fusedopt: fused, in-place, multi-tensor optimizer steps for NumPy, CuPy and more.

    import fusedopt as fo
    opt = fo.Adam(params, lr=1e-3)
    opt.step(grads)

`fo.functional` holds the stateless in-place ops, `fo.reference` the float64 NumPy
references they are tested against.
"""

from __future__ import annotations

from . import _cpu, amp, functional, reference
from . import batched, schedules, transfer
from ._precision import DeviceStepInfo, Precision, StepInfo
from .checkpoint import load, save
from .lbfgs import LBFGS
from .newton import Newton
from .optimizer import Optimizer
from .optimizers import SGD, Adadelta, Adagrad, Adam, AdamW, RMSprop

__version__ = "0.1.0"

__all__ = ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "LBFGS", "Newton",
           "DeviceStepInfo", "Optimizer", "Precision", "StepInfo", "amp", "batched",
           "functional", "reference", "schedules", "transfer", "set_num_threads", "get_num_threads",
           "cuda_available", "cuda_unavailable_reason", "save", "load"]


def set_num_threads(n: int) -> None:
    """Threads of the CPU kernels (default: OpenMP's, i.e. OMP_NUM_THREADS)."""
    _cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads of the CPU kernels."""
    return _cpu.get_num_threads()


def cuda_available() -> bool:
    """True when this build has the CUDA module and a CUDA device is usable.

    The CUDA module links the CUDA 13 runtime statically: it needs an NVIDIA driver
    of the 580 series or newer. When a driver is installed but too old, this returns
    False and warns (RuntimeWarning) with the versions found, since the GPU is then
    there but unusable; `cuda_unavailable_reason()` says why in every case.
    """
    reason = cuda_unavailable_reason()
    if reason is not None and "older than the CUDA" in reason:
        import warnings

        warnings.warn(f"fusedopt: the GPU cannot be used: {reason}", RuntimeWarning,
                      stacklevel=2)
    return reason is None


def cuda_unavailable_reason() -> str | None:
    """Why `cuda_available()` is False, in words, or None when a device is usable: no
    CUDA module in this build, no NVIDIA driver, a driver older than the CUDA runtime
    the module is linked with (with both versions), or no device."""
    from ._backend import cuda_module

    module = cuda_module()
    if module is None:
        return ("this build of fusedopt has no CUDA module (built without nvcc, or with "
                "FUSEDOPT_CUDA=OFF)")
    if module.device_count() > 0:
        return None
    return module.device_error() or "no CUDA device"
