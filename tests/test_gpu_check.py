"""benchmarks/gpu_check.sh, the parts that need no GPU: the dry run reports what it
finds and what it would run; without a GPU the check stops before building, with a
clear reason and exit status 2, and still writes its report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path, *args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "report.md"),
                           "--build-dir", str(tmp_path / "build"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def has_gpu():
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=60).returncode == 0


def test_dry_run_reports_and_runs_nothing(tmp_path):
    done = run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "report.md").read_text()
    for part in ("# fusedopt GPU check", "## Prerequisites", "## Plan", "## Summary",
                 "tests/test_cuda.py", "bench_gpu.py", "dry run"):
        assert part in report, part
    assert not (tmp_path / "build").exists()
    if not has_gpu():
        assert "GPU: none found" in report and "prerequisite(s) missing" in report


@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_stops_before_building(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "exit status: 2 (prerequisites missing: an NVIDIA GPU" in report
    assert "## Build" not in report
    assert not (tmp_path / "build").exists()


def test_unknown_arguments_are_refused(tmp_path):
    done = run(tmp_path, "--frobnicate")
    assert done.returncode == 2 and "unknown argument --frobnicate" in done.stderr
