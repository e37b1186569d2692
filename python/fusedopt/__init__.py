"""fusedopt: fused, in-place, multi-tensor optimizer steps for NumPy, CuPy and more.

    import fusedopt as fo
    opt = fo.Adam(params, lr=1e-3)
    opt.step(grads)

`fo.functional` holds the stateless in-place ops, `fo.reference` the float64 NumPy
references they are tested against, `fo.algorithms` the table of algorithms every
front-end is generated from.
"""

from . import _cpu, algorithms, amp, functional, reference
from . import batched, schedules, transfer
from ._precision import DeviceStepInfo, Precision, StepInfo
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
    "flat_arrays", "set_num_threads", "get_num_threads", "cuda_available"]


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

    Returns
    -------
    bool
        True when this build has the CUDA module (``fusedopt._cuda``) and a CUDA
        device is present. Importing fusedopt never needs a GPU or its driver; CuPy
        arrays and torch CUDA tensors need this to be True.
    """
    from ._backend import cuda_module

    module = cuda_module()
    return module is not None and module.device_count() > 0
