"""The step benchmark, fusedopt's main job: its optimizer steps against NumPy written by
hand and torch.optim, and against the limit of this machine, measured in the same run.

    python -m fusedopt.bench              # or: fusedopt-bench
    python -m fusedopt.bench --help

Each row is checked against the float64 reference before it is timed. The table, a
JSON file and a plot land in a results folder (``--out``), whose paths it prints.
"""

from ._cli import main

__all__ = ["main"]
