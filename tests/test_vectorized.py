"""The CPU kernels' inner loops must vectorize: a loop GCC leaves scalar runs several
times slower than memory allows, and no result would show it. This compiles the
kernels once for AVX2 with GCC's vectorization report and checks that every
instantiation of the driver's two loops was vectorized (float16 with stochastic rounding
included, whose neighbour search once stayed scalar and ran 16 times slower), and so was
every instantiation of the first pass of the two-pass rules (LAMB's and LARS's per-tensor
sums, whose terms once went through per-lane arrays in memory and stayed scalar).

Where FUSEDOPT_VEC_REPORT_FILE names the report that the package's build wrote of the
same compile (CMakeLists.txt; CI sets it), and that report is newer than every source,
it is read instead, and the kernels are not compiled a second time."""

import atexit
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "cpu" / "kernels.cpp"
DRIVER = ROOT / "csrc" / "cpu" / "driver.h"
FIRST_PASS = ROOT / "csrc" / "cpu" / "per_tensor.h"
LAUNCHER = ROOT / "tools" / "vec_report.sh"  # the build's: the report's GCC options, once


def _loop_lines():
    """The driver's two loops over elements: a chunk of a long piece (after its prefetch)
    and the rest (a short piece, or a long one's last elements)."""
    lines = DRIVER.read_text().splitlines()
    found = [n for n, line in enumerate(lines, 1)
             if line.strip().startswith(("for (std::int64_t i = i0; i < i0 + kChunk; ++i)",
                                         "for (std::int64_t i = i0; i < hi; ++i)"))]
    assert len(found) == 2, "driver loops not found"
    return found


def _first_pass_line():
    """The body of the first pass's SIMD loop, where GCC reports it."""
    lines = FIRST_PASS.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip() == "#pragma omp simd":
            return n + 2
    raise AssertionError("first-pass loop not found")


HAVE_GCC = shutil.which("g++") is not None and KERNELS.exists() and LAUNCHER.exists()


def _build_report():
    """The report the package's own build wrote of its AVX2 kernels (CMakeLists.txt,
    FUSEDOPT_VEC_REPORT_FILE, which CI sets for its build and for this run), where it
    names an existing, non-empty file newer than every source of the CPU kernels; else
    None, and the kernels are compiled here."""
    name = os.environ.get("FUSEDOPT_VEC_REPORT_FILE")
    if not name:
        return None
    report = pathlib.Path(name)
    if not report.is_file() or report.stat().st_size == 0:
        return None
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp")]
    if not sources or report.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        return None
    return report


class _Built:
    """The build's report, read as the compile's result."""

    def __init__(self, report):
        self.report = report

    def result(self):
        """(0, the compiler's messages)."""
        return 0, self.report.read_text()


class _Compile:
    """The report's compile (minutes, one core), started when pytest imports this file
    (at collection, before the first test runs), so that it runs beside the other tests
    instead of after them; the test waits for it. Its files go when the process ends."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fusedopt-vec-")
        self.report = pathlib.Path(self.dir) / "report.txt"
        self.errors = pathlib.Path(self.dir) / "errors.txt"
        cmd = ["sh", str(LAUNCHER), str(self.report),
               "g++", "-std=c++17", "-O3", "-ffp-contract=off", "-fno-math-errno",
               "-fno-trapping-math", "-fopenmp", "-mavx2", "-mfma", "-mf16c",
               "-DFO_ISA_NS=isa_check", "-c", str(KERNELS), "-o",
               str(pathlib.Path(self.dir) / "k.o")]
        with open(self.errors, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        atexit.register(self.close)

    def result(self, timeout=900):
        """(return code, the compiler's report, then its other messages)."""
        code = self.proc.wait(timeout=timeout)
        report = self.report.read_text() if self.report.exists() else ""
        return code, report + self.errors.read_text()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_BUILT = _build_report()
_COMPILE = _Built(_BUILT) if _BUILT else _Compile() if HAVE_GCC else None


@pytest.mark.skipif(_COMPILE is None, reason="needs g++ and the source tree")
def test_every_driver_loop_vectorizes():
    code, messages = _COMPILE.result()
    assert code == 0, messages[-2000:]
    for line in _loop_lines():
        # the file name whole: quant_driver.h's lines are not the driver loop's
        at_loop = [m for m in messages.splitlines()
                   if re.search(rf"(^|/)driver\.h:{line}:\d+:", m)]
        vectorized = [m for m in at_loop if "loop vectorized using 32 byte vectors" in m]
        failed = [m for m in at_loop if "missed: couldn't vectorize loop" in m]
        assert len(vectorized) > 300, f"line {line}: only {len(vectorized)} vectorized versions"
        assert not failed, f"line {line}: {len(failed)} scalar loop versions:\n" + \
            "\n".join(failed[:5])
    line = _first_pass_line()
    at_loop = [m for m in messages.splitlines()
               if re.search(rf"per_tensor\.h:{line}:\d+:", m)]
    vectorized = [m for m in at_loop if "loop vectorized using 32 byte vectors" in m]
    failed = [m for m in at_loop if "missed: couldn't vectorize loop" in m]
    # 6 two-pass kernels (lamb, lars, lars_momentum and their 3 probes) x 14 layouts
    assert len(vectorized) >= 84, f"only {len(vectorized)} vectorized first-pass versions"
    assert not failed, f"{len(failed)} scalar first-pass versions:\n" + "\n".join(failed[:5])
