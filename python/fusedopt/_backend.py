"""The compiled backends, chosen by device. The CUDA module is imported lazily, on the
first GPU array, so that `import fusedopt` works on machines with no GPU driver."""

from __future__ import annotations

from . import _cpu


class Cpu:
    name = "cpu"

    @staticmethod
    def step(kernel, dtype, ptrs, sizes, hyper, state_dtype=-1, extra=0, grad_scale=1.0,
             stochastic=False, key=0, step=1.0, l1=0.0, ema_decay=0.0, unsigned_states=0):
        # positional: the binding's keyword matching costs more than a small step's kernel
        _cpu.step(kernel, dtype, ptrs, sizes, hyper, state_dtype, extra, grad_scale,
                  stochastic, key, step, l1, ema_decay, unsigned_states)


class _Cuda:
    name = "cuda"

    def __init__(self, module):
        self.module = module

    @staticmethod
    def stream_of(stream, arrays, device):
        """The cudaStream_t (an int) a call runs on: `stream` (an int, or an object with
        `ptr` or `cuda_stream`), else the current stream of the arrays' producer."""
        if stream is None:
            return current_stream(arrays[0], device - 1)
        if isinstance(stream, int):
            return stream
        return int(getattr(stream, "ptr", getattr(stream, "cuda_stream", stream)))

    def step(self, kernel, dtype, ptrs, sizes, hyper, *, stream, **mode):
        self.module.step(kernel, dtype, ptrs, sizes, hyper, stream, **mode)


_cuda_backend = None


def cuda_module():
    """`fusedopt._cuda`, or None when this build has no CUDA module."""
    import importlib.util

    if importlib.util.find_spec("fusedopt._cuda") is None:
        return None
    from . import _cuda  # a module that exists but fails to load raises here, loudly

    return _cuda


def for_device(op, device):
    global _cuda_backend
    if device == 0:
        return Cpu
    if _cuda_backend is None:
        module = cuda_module()
        if module is None:
            raise TypeError(f"{op}: got arrays on cuda:{device - 1}, but this build of fusedopt "
                            "has no CUDA module (it was built without nvcc, or with "
                            "FUSEDOPT_CUDA=OFF)")
        _cuda_backend = _Cuda(module)
    return _cuda_backend


def current_stream(array, ordinal):
    """The current stream of device `ordinal` as the producer of `array` sees it: torch's
    for a torch tensor, CuPy's otherwise."""
    if type(array).__module__.startswith("torch"):
        import torch

        return int(torch.cuda.current_stream(array.device).cuda_stream)
    import cupy

    with cupy.cuda.Device(ordinal):
        return int(cupy.cuda.get_current_stream().ptr)
