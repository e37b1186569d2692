"""`python -m fusedopt.bench`, the main job: one short run on the tiny workload, in a
process of its own, and the files it writes (table, JSON, PNG plot)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import zlib

import pytest

from fusedopt.bench import _cli

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _env():
    """The test's own environment, with the directory fusedopt was imported from on
    PYTHONPATH (a development build is not installed)."""
    import fusedopt

    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(fusedopt.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "fusedopt.bench", "--workloads", "tiny", "--algos", "adam",
         "--repeats", "3", "--threads", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def test_prints_the_table_and_the_paths(run):
    proc, out = run
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fusedopt ") and "step benchmark" in lines[0]
    assert any(line.startswith("fusedopt (fusedopt, fusedopt-class") for line in lines)
    assert any(line.startswith("tiny") and "adam" in line for line in lines)
    assert "limit: a measured streaming kernel" in proc.stdout
    assert "can beat the limit by a few percent" in proc.stdout
    for name in ("table.txt", "table.md", "results.json", "plot.png" if HAS_MPL else None):
        if name:
            assert str(out / name) in proc.stdout
    # no tty: a counter per group instead of a bar, on stderr
    assert "[1/1] adam on tiny" in proc.stderr


def test_says_which_competitors_are_missing(run):
    proc, _ = run
    top = proc.stdout.split("workload")[0]
    if HAS_TORCH:
        assert "torch-loop, torch-foreach, torch-fused" in top
        assert "not installed: torch.optim" not in top
    else:
        assert "not installed: torch.optim (pip install torch==2.13.0)" in top
    if importlib.util.find_spec("deepspeed") is None:
        assert "not installed: DeepSpeed's CPU optimizers" in top


def test_json_holds_sane_results(run):
    _, out = run
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["threads"] == 2 and data["machine"]["dtype"] == "float32"
    rows = data["results"]
    keys = [r["key"] for r in rows]
    expected = ["limit", "fusedopt", "fusedopt-class", "numpy"]
    if HAS_TORCH:
        expected += ["fusedopt-torch", "fusedopt-torch-flat", "torch-loop", "torch-foreach",
                     "torch-fused"]
    assert sorted(keys) == sorted(expected)
    for r in rows:
        assert (r["workload"], r["algo"], r["tensors"], r["elements"]) == \
            ("tiny", "adam", 10000, 40000)
        assert r["bytes"] == 40000 * 4 * 7  # p, g, m, v read; p, m, v written
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["us_per_tensor"] == pytest.approx(r["ms"] * 1e3 / 10000)
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert 0 < r["pct_limit"] < 1000
        if r["kind"] != "limit":
            assert r["ms"] == pytest.approx(sorted(r["times_ms"])[1])  # the median of 3
    assert next(r for r in rows if r["kind"] == "limit")["pct_limit"] == 100.0
    assert all(r["repeats"] == 3 for r in rows if r["kind"] != "limit")
    ours = [r for r in rows if r["kind"] == "fusedopt"]
    assert all(r["vs_best"] > 0 for r in ours)
    assert sum(r["best_competitor"] for r in rows) == 1
    table = (out / "table.txt").read_text()
    assert all(r["impl"] in table for r in rows)
    markdown = (out / "table.md").read_text()
    assert "| workload | algorithm |" in markdown and "|---|---|" in markdown


def _png_chunks(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc, = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed: no plot is written")
def test_plot_is_a_valid_png(run):
    _, out = run
    data = (out / "plot.png").read_bytes()
    chunks = _png_chunks(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert 500 < width < 3000 and 300 < height < 3000
    import matplotlib.image

    pixels = matplotlib.image.imread(out / "plot.png")
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # not a blank image


def test_png_check_catches_a_corrupt_file(run):
    _, out = run
    if not HAS_MPL:
        pytest.skip("matplotlib is not installed: no plot to corrupt")
    data = bytearray((out / "plot.png").read_bytes())
    data[40] ^= 0xFF
    with pytest.raises(AssertionError, match="bad CRC"):
        _png_chunks(bytes(data))


def _plan(argv):
    from fusedopt.bench._algos import ALGOS

    return _cli.make_plan(_cli.parse_args(argv), ALGOS).plan


def test_default_plan():
    assert _plan([]) == [("1x16M", "sgd_momentum"), ("1x16M", "adagrad"), ("1x16M", "rmsprop"),
                         ("1x16M", "adadelta"), ("1x16M", "adam"), ("1000x16K", "adam"),
                         ("tiny", "adam")]
    assert _plan(["--algos", "sgd", "--workloads", "tiny"]) == [("tiny", "sgd")]
    assert _plan(["--algos", "adamw,sgd"]) == [
        ("1x16M", "sgd"), ("1x16M", "adamw"), ("1000x16K", "sgd"), ("1000x16K", "adamw")]
    assert _plan(["--algos", "adam"]) == [("1x16M", "adam"), ("1000x16K", "adam"), ("tiny", "adam")]


def test_any_row_of_the_table():
    from fusedopt.algorithms import SPECS
    from fusedopt.bench._algos import ALGOS

    rows = [name for spec in SPECS.values()  # (bench={}: no row of the dense table)
            for name in (spec.bench if spec.bench is not None else {spec.name: {}})]
    assert list(ALGOS) == rows
    assert {"nadam", "radam", "adamax", "asgd", "rprop"} <= set(rows)
    assert _plan(["--algos", "rprop,nadam", "--workloads", "1x16M"]) == [
        ("1x16M", a) for a in rows if a in ("nadam", "rprop")]
    everything = _plan(["--algos", "all", "--workloads", "all"])
    assert everything == [(w, a) for w in _cli.WORKLOADS for a in rows]


def test_bad_arguments_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        _plan(["--algos", "adam,bogus"])
    assert "unknown bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli.parse_args(["--workloads", "huge"])
    assert "unknown huge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli.parse_args(["--threads", "-1"])
    assert "must not be negative" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown or unavailable bogus"):
        _cli.main(["--impls", "bogus", "--workloads", "tiny", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_console_script_is_declared():
    from importlib import metadata

    try:
        dist = metadata.distribution("fusedopt")
    except metadata.PackageNotFoundError:
        pytest.skip("fusedopt is not installed as a distribution (a development build)")
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts.get("fusedopt-bench") == "fusedopt.bench:main"
