"""tools/build_dirs.py: a build directory recorded by a deleted isolated environment is
re-homed, its CMake cache entries into that environment dropped with their help lines;
any other build directory is left alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "build_dirs.py"
if not TOOLS.is_file():
    pytest.skip("tools/ is not next to the tests (not a source checkout)",
                allow_module_level=True)
spec = importlib.util.spec_from_file_location("build_dirs", TOOLS)
build_dirs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_dirs)

CACHE = """# This is the CMakeCache file.

//Path to a program.
CMAKE_MAKE_PROGRAM:FILEPATH={env}/overlay/bin/ninja

//The directory containing a CMake configuration file for pybind11.
pybind11_DIR:PATH={env}/overlay/lib/site-packages/pybind11/share/cmake/pybind11

//Build the CUDA module
FUSEDOPT_CUDA:STRING=AUTO
//Directories where pybind11 and possibly Python headers are located
pybind11_INCLUDE_DIRS:INTERNAL={env}/overlay/include;/usr/include/python3
_Python_EXECUTABLE:INTERNAL=/venv/bin/python
"""


def _build_dir(root, env, version="1.1.2"):
    d = root / "build" / "cp311-cp311-linux_x86_64"
    d.mkdir(parents=True)
    skbuild = f"{env}/overlay/lib/site-packages/scikit_build_core"
    (d / ".skbuild-info.json").write_text(json.dumps(
        {"source_dir": str(root), "skbuild_path": skbuild, "skbuild_version": version}))
    (d / "CMakeCache.txt").write_text(CACHE.format(env=env))
    return d


def test_deleted_environment_is_replaced(tmp_path):
    env = tmp_path / "pip-build-env-old"  # never created: deleted
    d = _build_dir(tmp_path, env)
    assert build_dirs.adopt_build_dirs(tmp_path, "1.1.2", "/new/scikit_build_core") == [d]
    info = json.loads((d / ".skbuild-info.json").read_text())
    assert info["skbuild_path"] == "/new/scikit_build_core"
    assert info["source_dir"] == str(tmp_path)
    cache = (d / "CMakeCache.txt").read_text()
    assert str(env) not in cache
    assert cache == ("# This is the CMakeCache file.\n\n\n\n//Build the CUDA module\n"
                     "FUSEDOPT_CUDA:STRING=AUTO\n_Python_EXECUTABLE:INTERNAL=/venv/bin/python\n")


def test_existing_environment_or_other_version_is_left_alone(tmp_path):
    env = tmp_path / "env"
    (env / "overlay/lib/site-packages/scikit_build_core").mkdir(parents=True)
    d = _build_dir(tmp_path, env)
    before = (d / "CMakeCache.txt").read_text(), (d / ".skbuild-info.json").read_text()
    assert build_dirs.adopt_build_dirs(tmp_path, "1.1.2", "/new") == []
    assert ((d / "CMakeCache.txt").read_text(), (d / ".skbuild-info.json").read_text()) == before

    other = tmp_path / "other"
    d = _build_dir(other, other / "gone")
    before = (d / "CMakeCache.txt").read_text()
    assert build_dirs.adopt_build_dirs(other, "1.0.0", "/new") == []
    assert (d / "CMakeCache.txt").read_text() == before


def test_gone_root_is_the_topmost_missing_folder(tmp_path):
    assert build_dirs.gone_root(tmp_path) is None
    assert build_dirs.gone_root(tmp_path / "a" / "b" / "c") == tmp_path / "a"
