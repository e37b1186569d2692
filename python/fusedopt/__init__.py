"""fusedopt: fused, in-place, multi-tensor optimizer steps for NumPy, CuPy and more.

    import fusedopt as fo
    opt = fo.Adam(params, lr=1e-3)
    opt.step(grads)

`fo.functional` holds the stateless in-place ops, `fo.reference` the float64 NumPy
references they are tested against, `fo.algorithms` the table of algorithms every
front-end is generated from.
"""

from __future__ import annotations

from . import _cpu, algorithms, amp, functional, reference
from . import batched, schedules, transfer
from ._precision import DeviceStepInfo, Precision, StepInfo
from .checkpoint import load, save
from .flat import FlatArrays, flat_arrays
from .lbfgs import LBFGS
from .newton import Newton
from .optimizer import Optimizer
from .optimizers import CLASSES as _CLASSES

globals().update({_cls.__name__: _cls for _cls in _CLASSES.values()})

__version__ = "0.1.0"

__all__ = [c.__name__ for c in _CLASSES.values()] + [
    "LBFGS", "Newton", "DeviceStepInfo", "FlatArrays", "Optimizer", "Precision", "StepInfo",
    "algorithms", "amp", "batched", "functional", "reference", "schedules", "transfer",
    "flat_arrays", "set_num_threads", "get_num_threads", "cuda_available",
    "cuda_unavailable_reason", "save", "load"]


def set_num_threads(n: int) -> None:
    """Set the number of threads of the CPU kernels.

    Parameters
    ----------
    n : int
        Threads of every following CPU step, at least 1. The default is OpenMP's,
        i.e. ``OMP_NUM_THREADS`` or the number of cores.

    Raises
    ------
    ValueError
        If `n` is less than 1.

    See Also
    --------
    get_num_threads

    Examples
    --------
    >>> import fusedopt as fo
    >>> fo.set_num_threads(1)
    >>> fo.get_num_threads()
    1
    """
    _cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    """Return the number of threads of the CPU kernels.

    Returns
    -------
    int
        The count set by `set_num_threads`, or OpenMP's default.
    """
    return _cpu.get_num_threads()


def cuda_available() -> bool:
    """Tell whether CUDA arrays can be stepped.

    The CUDA module links the CUDA 13 runtime statically: it needs an NVIDIA driver
    of the 580 series or newer. When a driver is installed but too old, this returns
    False and warns with the versions found, since the GPU is then there but
    unusable; `cuda_unavailable_reason` says why in every case.

    Returns
    -------
    bool
        True when this build has the CUDA module (``fusedopt._cuda``) and a CUDA
        device is usable. Importing fusedopt never needs a GPU or its driver; CuPy
        arrays and torch CUDA tensors need this to be True.

    Warns
    -----
    RuntimeWarning
        When an NVIDIA driver is installed but older than the CUDA runtime the module
        is linked with.

    See Also
    --------
    cuda_unavailable_reason
    """
    reason = cuda_unavailable_reason()
    if reason is not None and "older than the CUDA" in reason:
        import warnings

        warnings.warn(f"fusedopt: the GPU cannot be used: {reason}", RuntimeWarning,
                      stacklevel=2)
    return reason is None


def cuda_unavailable_reason() -> str | None:
    """Say why CUDA arrays cannot be stepped.

    Returns
    -------
    str or None
        None when a CUDA device is usable; otherwise the reason in words: no CUDA
        module in this build, no NVIDIA driver, a driver older than the CUDA runtime
        the module is linked with (with both versions), or no device.

    See Also
    --------
    cuda_available
    """
    from ._backend import cuda_module

    module = cuda_module()
    if module is None:
        return ("this build of fusedopt has no CUDA module (built without nvcc, or with "
                "FUSEDOPT_CUDA=OFF)")
    if module.device_count() > 0:
        return None
    return module.device_error() or "no CUDA device"
