"""Shared fixtures: a seeded random generator, array snapshots, and clean global settings."""

from __future__ import annotations

import os

import numpy as np
import pytest

import fusedopt
from cases import assert_same_bits

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only test_fuzz.py needs it (the test extra installs it)
    settings = None

# Property-based tests (test_fuzz.py): "ci", the default, runs a bounded number of
# examples, the same ones on every run (no example database); "long" draws thousands
# of fresh ones: FUSEDOPT_HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py
if settings is not None:
    _HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                             HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=150, derandomize=True, database=None,
                              **_HYPOTHESIS)
    settings.register_profile("long", max_examples=3000, database=None, **_HYPOTHESIS)
    settings.load_profile(os.environ.get("FUSEDOPT_HYPOTHESIS_PROFILE", "ci"))

# FUSEDOPT_TEST_ISA=avx2|avx512|base runs the whole suite on one instruction set of
# the CPU kernels (tools/sanitize.sh runs it once per set); tests that switch sets
# themselves come back to it.
if os.environ.get("FUSEDOPT_TEST_ISA"):
    fusedopt._cpu.set_isa(os.environ["FUSEDOPT_TEST_ISA"])


def pytest_report_header(config):
    return f"fusedopt CPU kernels: {fusedopt._cpu.get_isa()}, {fusedopt.get_num_threads()} threads"


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
