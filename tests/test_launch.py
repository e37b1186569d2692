"""The launcher of the distributed tests (tests/_launch.py): a job that hangs is stopped
at its time limit, and none of its processes (mpiexec's ranks included) outlives it."""

from __future__ import annotations

import time

import pytest

from _launch import mpiexec, run_mpiexec, run_ranks, running

SLEEPER = """
import os, sys, time
with open(os.path.join(sys.argv[1], f"pid-{os.getpid()}"), "w"):
    pass
time.sleep(120)
"""


def _check_stopped(tmp_path, launch):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out|exit codes"):
        launch(str(script), [str(tmp_path)]).check()
    assert time.monotonic() - start < 20
    pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("pid-*")]
    assert len(pids) == 2, "the ranks did not start"
    assert not [pid for pid in pids if running(pid)]


def test_hanging_ranks_are_killed_at_the_limit(tmp_path):
    _check_stopped(tmp_path, lambda script, args: run_ranks(script, args, 2, timeout=3))


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install 'fusedopt[mpi]')")
def test_a_hanging_mpiexec_job_is_killed_at_the_limit(tmp_path):
    _check_stopped(tmp_path, lambda script, args: run_mpiexec(script, args, 2, timeout=3))
