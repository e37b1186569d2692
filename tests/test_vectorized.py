"""The CPU kernels' inner loops must vectorize: a loop GCC leaves scalar runs several
times slower than memory allows, and no result would show it. This compiles the
kernels once for AVX2 with GCC's vectorization report and checks that every
instantiation of the driver's loop was vectorized (float16 with stochastic rounding
included, whose neighbour search once stayed scalar and ran 16 times slower), and so was
every instantiation of the first pass of the two-pass rules (LAMB's and LARS's per-tensor
sums, whose terms once went through per-lane arrays in memory and stayed scalar)."""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cpu" / "kernels.cpp"
DRIVER = ROOT / "csrc" / "cpu" / "driver.h"
FIRST_PASS = ROOT / "csrc" / "cpu" / "per_tensor.h"


def _loop_line():
    for n, line in enumerate(DRIVER.read_text().splitlines(), 1):
        if line.strip().startswith("for (std::int64_t i = lo; i < hi; ++i)"):
            return n
    raise AssertionError("driver loop not found")


def _first_pass_line():
    """The body of the first pass's SIMD loop, where GCC reports it."""
    lines = FIRST_PASS.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip() == "#pragma omp simd":
            return n + 2
    raise AssertionError("first-pass loop not found")


@pytest.mark.skipif(shutil.which("g++") is None or not KERNELS.exists(),
                    reason="needs g++ and the source tree")
def test_every_driver_loop_vectorizes(tmp_path):
    cmd = ["g++", "-std=c++17", "-O3", "-ffp-contract=off", "-fno-math-errno",
           "-fno-trapping-math", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-DFO_ISA_NS=isa_check", "-c",
           str(KERNELS), "-o", str(tmp_path / "k.o"), "-fopt-info-vec-all"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    line = _loop_line()
    # the file name whole: quant_driver.h's lines are not the driver loop's
    at_loop = [m for m in out.stderr.splitlines() if re.search(rf"(^|/)driver\.h:{line}:\d+:", m)]
    vectorized = [m for m in at_loop if "loop vectorized using 32 byte vectors" in m]
    failed = [m for m in at_loop if "missed: couldn't vectorize loop" in m]
    assert len(vectorized) > 300, f"only {len(vectorized)} vectorized loop versions"
    assert not failed, f"{len(failed)} scalar loop versions:\n" + "\n".join(failed[:5])
    line = _first_pass_line()
    at_loop = [m for m in out.stderr.splitlines()
               if re.search(rf"per_tensor\.h:{line}:\d+:", m)]
    vectorized = [m for m in at_loop if "loop vectorized using 32 byte vectors" in m]
    failed = [m for m in at_loop if "missed: couldn't vectorize loop" in m]
    # 6 two-pass kernels (lamb, lars, lars_momentum and their 3 probes) x 14 layouts
    assert len(vectorized) >= 84, f"only {len(vectorized)} vectorized first-pass versions"
    assert not failed, f"{len(failed)} scalar first-pass versions:\n" + "\n".join(failed[:5])
