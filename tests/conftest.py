"""Shared fixtures: a seeded random generator, array snapshots, and clean global settings."""

from __future__ import annotations

import numpy as np
import pytest

import fusedopt
from cases import assert_same_bits


@pytest.fixture
def rng():
    """A generator with a fixed seed: every run sees the same data."""
    return np.random.default_rng(20240611)


class Snapshot:
    """Bit-exact copies of arrays, to prove later that none of them changed."""

    def __init__(self, arrays):
        self.arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.copies = [a.copy() for a in self.arrays]

    def assert_unchanged(self):
        for k, (a, before) in enumerate(zip(self.arrays, self.copies)):
            assert_same_bits(a, before, f"array {k} of the snapshot changed")


def _arrays_in(obj):
    """Every NumPy array in a nest of lists, tuples and dicts."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays_in(v)


@pytest.fixture
def snapshot():
    """snapshot(*nests) -> Snapshot of every array found in the given lists/dicts."""
    return lambda *nests: Snapshot([a for n in nests for a in _arrays_in(n)])


@pytest.fixture(autouse=True)
def _restore_cpu_settings():
    """Tests that change the thread count or instruction set leave them as they were."""
    threads, isa = fusedopt.get_num_threads(), fusedopt._cpu.get_isa()
    yield
    fusedopt.set_num_threads(threads)
    fusedopt._cpu.set_isa(isa)
