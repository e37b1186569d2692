"""`python -m fusedopt`: what this build of fusedopt holds, and where to go next."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

import numpy as np

import fusedopt
from fusedopt import _cpu


def _cuda_line():
    if importlib.util.find_spec("fusedopt._cuda") is None:
        return ("not built (built only where nvcc and a GPU are found, or with "
                "FUSEDOPT_CUDA=ON)")
    from fusedopt import _cuda

    count = _cuda.device_count()
    if count:
        return f"built; {count} CUDA device{'s' if count > 1 else ''}"
    return f"built; no CUDA device usable ({_cuda.device_error() or 'none found'})"


def _version_of(module):
    if importlib.util.find_spec(module) is None:
        return "not installed"
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "installed"


def main() -> int:
    print(f"fusedopt {fusedopt.__version__} ({os.path.dirname(fusedopt.__file__)})")
    print(f"  Python {platform.python_version()}, NumPy {np.__version__}, "
          f"torch {_version_of('torch')}, CuPy {_version_of('cupy')}")
    print(f"  CPU kernels: instruction set {_cpu.get_isa()} ({_cpu.vector_bits()}-bit vectors), "
          f"{fusedopt.get_num_threads()} threads (fusedopt.set_num_threads, OMP_NUM_THREADS)")
    print(f"  CUDA module: {_cuda_line()}")
    print()
    print("The step benchmark, against NumPy and torch.optim and the limit of this machine:")
    print("  python -m fusedopt.bench        (or: fusedopt-bench; --help lists its options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
