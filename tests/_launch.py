"""Start the processes of a distributed test, bounded in time, and leave none behind.

`run_ranks` starts one process per rank (torch.distributed: rank, world size and a
rendezvous file in the environment), `run_mpiexec` one `mpiexec -n N` job. Both wait
at most `timeout` seconds; on timeout, and after a normal end alike, every process
they started is killed by its id: their descendants, and any process whose environment
carries the launch's token (mpiexec's proxies and ranks start sessions of their own and
outlive a killed mpiexec as orphans). The output of all processes comes back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import fusedopt

TESTS = Path(__file__).resolve().parent
# the fusedopt that the test process imported, for the workers too
PYTHONPATH = os.pathsep.join([str(Path(fusedopt.__file__).resolve().parents[1]), str(TESTS)])


class Finished:
    """What the processes left: exit codes, their output and the wall time."""

    def __init__(self, codes, output, elapsed):
        self.codes, self.output, self.elapsed = codes, output, elapsed

    def check(self):
        """AssertionError with the output unless every process exited with 0."""
        if any(self.codes):
            raise AssertionError(f"exit codes {self.codes}:\n{self.output[-6000:]}")
        return self


TOKEN = "FUSEDOPT_TEST_JOB"


def environment(token, **extra):
    env = dict(os.environ)
    env[TOKEN] = token
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PYTHONPATH, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _children():
    """{parent pid: [child pids]} of every process now running (Linux /proc)."""
    tree = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid, tree):
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _marked(token):
    """Pids of the processes whose environment holds TOKEN=token."""
    needle = f"{TOKEN}={token}".encode() + b"\0"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


def _kill_all(procs, token):
    """SIGKILL the processes, their descendants and whatever carries the token, by pid."""
    tree = _children()
    pids = [p.pid for p in procs if p.poll() is None]
    for p in procs:
        pids += _descendants(p.pid, tree)
    pids += _marked(token)
    for pid in set(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()
    deadline = time.monotonic() + 10  # the kills take effect asynchronously
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.02)


def running(pid):
    """Whether process `pid` exists and has not ended (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _run(commands, envs, timeout):
    """Start every command with its environment (made by `environment` with one token),
    wait for all of them (at most `timeout` seconds in all), then kill what is left."""
    token = envs[0][TOKEN]
    start = time.monotonic()
    logs, procs = [], []
    try:
        for cmd, env in zip(commands, envs):
            log = tempfile.TemporaryFile()
            logs.append(log)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        deadline = start + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
            if p.returncode != 0:  # the others might wait for it forever: stop now
                break
        _kill_all(procs, token)  # the other ranks after a failure, all after a timeout
        output = []
        for k, log in enumerate(logs):
            log.seek(0)
            output.append(f"--- process {k} ---\n" + log.read().decode(errors="replace"))
        output = "\n".join(output)
        if timed_out:
            raise AssertionError(f"timed out after {timeout} s and killed:\n{output[-6000:]}")
        return Finished([p.returncode for p in procs], output, time.monotonic() - start)
    finally:
        if procs:
            _kill_all(procs, token)
        for log in logs:
            log.close()


def run_ranks(script, args, nprocs, timeout, **env):
    """Run `python script *args` once per rank with torch.distributed's environment
    (RANK, LOCAL_RANK, WORLD_SIZE, and FUSEDOPT_TEST_RENDEZVOUS, a file:// init method
    in a fresh temporary directory, removed afterwards)."""
    folder = tempfile.mkdtemp(prefix="fo-rdzv-")
    try:
        init = f"file://{folder}/rendezvous"
        commands = [[sys.executable, str(TESTS / script), *map(str, args)]] * nprocs
        token = uuid.uuid4().hex
        envs = [environment(token, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=nprocs,
                            LOCAL_WORLD_SIZE=nprocs, FUSEDOPT_TEST_RENDEZVOUS=init, **env)
                for rank in range(nprocs)]
        return _run(commands, envs, timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def mpiexec():
    """The path of mpiexec next to this Python (the mpich wheel's), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def run_mpiexec(script, args, nprocs, timeout, **env):
    """Run `mpiexec -n nprocs python script *args` (MPIEXEC_TIMEOUT set as a second
    bound inside the job)."""
    cmd = [mpiexec(), "-n", str(nprocs), sys.executable, str(TESTS / script), *map(str, args)]
    token = uuid.uuid4().hex
    return _run([cmd], [environment(token, MPIEXEC_TIMEOUT=int(timeout), **env)], timeout)
