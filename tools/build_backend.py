"""fusedopt's PEP 517 build backend: scikit-build-core's, keeping its build directory across
pip's isolated builds.

pip builds every install in a new temporary environment (/tmp/pip-build-env-XXXX) holding
scikit-build-core and pybind11, and deletes it afterwards. scikit-build-core records the
environment it ran from in ``build/<wheel tag>/.skbuild-info.json``; when the next build
runs from another one, it deletes the CMake cache and the ``CMakeFiles`` folder, and with
it every compiled object: a second ``pip install ".[test]"`` after ``pip install ".[bench]"``
compiled everything again (minutes), although nothing had changed.

Before each build, this backend looks at the previous build's record. If the environment
it names is gone (a deleted isolated environment) and the scikit-build-core version is the
same, it records the current environment instead, and removes from the CMake cache every
entry that pointed into the deleted environment (pybind11's location, a build tool that
came with it), which CMake then finds again. The compile commands do not name that
environment either (cmake/pybind11_headers.cmake), so ninja recompiles only what changed.
In any other case the record is left alone and scikit-build-core clears the cache as
before, so the worst case is the old full rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

import scikit_build_core
import scikit_build_core.build as _backend
from scikit_build_core.build import *  # noqa: F401,F403 (the other hooks, unchanged)
from scikit_build_core.build import __all__ as _hooks
from scikit_build_core.cmake import DIR as _SKBUILD_DIR

__all__ = list(_hooks)
for _name in ("prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
    if hasattr(_backend, _name):  # defined where scikit-build-core can provide them
        globals()[_name] = getattr(_backend, _name)
        __all__.append(_name)


def _gone_root(path):
    """The topmost ancestor of `path` that no longer exists (the deleted environment)."""
    path = Path(path)
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def adopt_build_dirs(source_dir="."):
    """Re-home the build directories under `source_dir`/build whose recorded environment
    was deleted; return the ones changed."""
    adopted = []
    for record in Path(source_dir, "build").glob("*/.skbuild-info.json"):
        try:
            info = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("skbuild_version") != \
                scikit_build_core.__version__:
            continue
        gone = _gone_root(info.get("skbuild_path") or ".")
        if gone is None:
            continue
        cache = record.parent / "CMakeCache.txt"
        if cache.is_file():
            lines = cache.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if str(gone) not in line]
            cache.write_text("".join(kept), encoding="utf-8")
        info["skbuild_path"] = str(_SKBUILD_DIR)
        record.write_text(json.dumps(info, indent=2), encoding="utf-8")
        adopted.append(record.parent)
    return adopted


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    adopt_build_dirs()
    return _backend.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    adopt_build_dirs()
    return _backend.build_editable(wheel_directory, config_settings, metadata_directory)
