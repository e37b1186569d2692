"""The CPU kernels' inner loops must vectorize: a loop GCC leaves scalar runs several
times slower than memory allows, and no result would show it. This compiles the
kernels once for AVX2 with GCC's vectorization report and checks that every
instantiation of the driver's loop was vectorized (float16 with stochastic rounding
included, whose neighbour search once stayed scalar and ran 16 times slower)."""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cpu" / "kernels.cpp"
DRIVER = ROOT / "csrc" / "cpu" / "driver.h"


def _loop_line():
    for n, line in enumerate(DRIVER.read_text().splitlines(), 1):
        if line.strip().startswith("for (std::int64_t i = lo; i < hi; ++i)"):
            return n
    raise AssertionError("driver loop not found")


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
