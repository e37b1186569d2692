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

import scikit_build_core
import scikit_build_core.build as _backend
from build_dirs import adopt_build_dirs
from scikit_build_core.build import *  # noqa: F401,F403 (the other hooks, unchanged)
from scikit_build_core.build import __all__ as _hooks

try:  # the environment scikit-build-core records (its own folder)
    from scikit_build_core.cmake import DIR as _SKBUILD_DIR
except ImportError:  # another version's layout: leave its build directories to it
    _SKBUILD_DIR = None

__all__ = list(_hooks)
for _name in ("prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
    if hasattr(_backend, _name) and _name not in __all__:  # where it provides them
        globals()[_name] = getattr(_backend, _name)
        __all__.append(_name)


def _adopt():
    if _SKBUILD_DIR is not None:
        adopt_build_dirs(".", scikit_build_core.__version__, _SKBUILD_DIR)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _adopt()
    return _backend.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _adopt()
    return _backend.build_editable(wheel_directory, config_settings, metadata_directory)
