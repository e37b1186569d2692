"""fusedopt: fused, in-place, multi-tensor optimizer steps for NumPy, CuPy and more.

    import fusedopt as fo
    opt = fo.Adam(params, lr=1e-3)
    opt.step(grads)

`fo.functional` holds the stateless in-place ops, `fo.reference` the float64 NumPy
references they are tested against.
"""

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
           "cuda_available", "save", "load"]


def set_num_threads(n: int) -> None:
    """Threads of the CPU kernels (default: OpenMP's, i.e. OMP_NUM_THREADS)."""
    _cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    return _cpu.get_num_threads()


def cuda_available() -> bool:
    """True when this build has the CUDA module and a CUDA device is present."""
    from ._backend import cuda_module

    module = cuda_module()
    return module is not None and module.device_count() > 0
