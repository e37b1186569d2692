"""The table of algorithms: one spec per algorithm, from which every front-end derives.

`SPECS` maps an algorithm's name (``"adam"``) to its spec (see `_spec.Spec`): torch's
constructor defaults and validation messages, the state names as a function of the
options, which kernel runs for which options, and how the hyperparameters fill the
kernel's Hyper by field name. The NumPy classes (`fusedopt.Adam`, ...),
`fusedopt.torch`, `fusedopt.batched`, the functional ops (`fusedopt.functional`), the
tests' case table and the benchmarks are generated from it.

Adding an elementwise algorithm: its rule header in csrc/core (and its line in
rules.h), its spec in a module here (listed below), its reference in
`fusedopt.reference`, and its row in the tests' case table. Rules that need per-tensor
norms before their update (LAMB, LARS) declare a first pass of per-tensor sums in C++
(csrc/core/two_pass.h) and need nothing else here; per-group bookkeeping
(`Spec.advance_group`), buffers that start as copies of their param
(`State.like_param`) and train/eval modes (`Spec.mode_state`) are spec hooks too.
"""

from __future__ import annotations

from . import (adafactor, classic, lion, muon, schedulefree, sparse, torch_more,
               trust_ratio)
from ._spec import REQUIRED, Option, Spec, State, hyper_fields, pack

__all__ = ["SPECS", "Spec", "Option", "State", "REQUIRED", "hyper_fields", "pack", "get"]

SPECS = {spec.name: spec
         for module in (classic, torch_more, lion, trust_ratio, schedulefree, sparse, muon,
                        adafactor)
         for spec in module.SPECS}


def get(name):
    """The spec of an algorithm by name (``"adam"``) or class name (``"Adam"``)."""
    spec = SPECS.get(name)
    if spec is None:
        for s in SPECS.values():
            if s.title == name:
                return s
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(SPECS)}")
    return spec
