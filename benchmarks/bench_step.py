#!/usr/bin/env python3
"""The step benchmark, as `python -m fusedopt.bench` runs it (fusedopt/bench/ holds it).

    python benchmarks/bench_step.py --help
"""

import sys

try:
    from fusedopt.bench import main
except ImportError as e:
    sys.exit(f"bench_step: cannot import fusedopt ({e}); install it with "
             "`pip install .[bench]`, or build it and set PYTHONPATH=python")

if __name__ == "__main__":
    sys.exit(main())
