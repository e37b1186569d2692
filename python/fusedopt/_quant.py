"""8-bit optimizer state for the front-ends: buffers, names and initial values.

A quantized state buffer ``name`` is a uint8 array of the param's shape (codes of the
dynamic quantization maps, csrc/core/quant8.h) with a float32 array ``name_absmax`` of
one scale per block of `BLOCK` elements; the functional ops take the scales through
their ``absmax`` keyword. States that are never negative (`State.positive`) use the
unsigned code table, the others the signed one.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _cpu

BLOCK = _cpu.QUANT_BLOCK


def absmax_name(name):
    """The state entry of a quantized buffer's block scales."""
    return name + "_absmax"


def blocks(size):
    """Scales of a buffer of `size` elements."""
    return (int(size) + BLOCK - 1) // BLOCK


def size_of(obj):
    """Element count of an array of any kind (torch's `size` is a method)."""
    return int(np.prod(tuple(obj.shape), dtype=np.int64))


def constant(value, positive):
    """(code, scale) of a buffer filled with `value`: every block holds the same."""
    codes, scales = _cpu.quantize_blockwise(np.full(1, value, np.float32), bool(not positive))
    return int(codes[0]), float(scales[0])


def scales_like(obj, size):
    """float32 zeros for the block scales of `size` elements, where `obj` lives: NumPy for
    host memory (as `_arrays.zeros_like` makes state), CuPy or torch on a GPU."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.is_cpu:
            return np.zeros(blocks(size), np.float32)
        return torch.zeros(blocks(size), dtype=torch.float32, device=obj.device)
    if isinstance(obj, np.ndarray):
        return np.zeros(blocks(size), np.float32)
    import cupy

    with cupy.cuda.Device(obj.device.id):
        return cupy.zeros(blocks(size), np.float32)
