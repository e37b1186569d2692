"""The public API's surface: docstrings (numpydoc) on the public names of the modules that
have them, clean module namespaces, `py.typed`, and `python -m fusedopt`."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fusedopt as fo
from fusedopt import _precision, amp, newton, reference, schedules, transfer

DOCUMENTED = [schedules, transfer, amp, newton, reference]


def _public(module):
    for name in module.__all__:
        yield f"{module.__name__}.{name}", getattr(module, name)


def _documented_objects():
    for module in DOCUMENTED:
        yield from _public(module)
    for name in ("Precision", "StepInfo", "DeviceStepInfo"):
        yield f"fusedopt.{name}", getattr(_precision, name)
    for name in ("set_num_threads", "get_num_threads", "cuda_available"):
        yield f"fusedopt.{name}", getattr(fo, name)


def _takes_arguments(obj):
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return any(p not in ("self", "cls") for p in params)


@pytest.mark.parametrize("name,obj", list(_documented_objects()), ids=lambda x: str(x)[:40])
def test_numpydoc_docstring(name, obj):
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.strip() and not summary.startswith(" "), name
    if _takes_arguments(obj) and name != "fusedopt.StepInfo":  # a NamedTuple: Attributes
        assert "\nParameters\n----------\n" in doc, f"{name}: no Parameters section"
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and (inspect.isfunction(member) or
                                             isinstance(member, (property, staticmethod))):
                assert inspect.getdoc(getattr(obj, attr)), f"{name}.{attr} has no docstring"
    if inspect.isfunction(obj):
        returns = inspect.signature(obj).return_annotation
        assert returns is not inspect.Signature.empty, f"{name}: no return annotation"


@pytest.mark.parametrize("name,obj", [(n, o) for n, o in _documented_objects()
                                      if inspect.isfunction(o) or inspect.isclass(o)],
                         ids=lambda x: str(x)[:40])
def test_type_hints_on_public_parameters(name, obj):
    target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
    if inspect.isclass(target):
        return  # a NamedTuple's generated __init__
    for p in inspect.signature(target).parameters.values():
        if p.name in ("self", "cls") or p.kind is p.VAR_KEYWORD:
            continue
        assert p.annotation is not p.empty, f"{name}: parameter {p.name} has no type hint"
        assert not p.name.startswith("_"), f"{name}: private parameter {p.name}"


@pytest.mark.parametrize("module", DOCUMENTED, ids=lambda m: m.__name__)
def test_module_namespace_is_clean(module):
    """dir() and tab completion show what the module exports, not its imports."""
    extra = [n for n in dir(module) if not n.startswith("_") and n not in module.__all__]
    assert extra == [], f"{module.__name__} shows {extra}"
    assert sorted(module.__all__) == sorted(set(module.__all__))
    for name in module.__all__:
        assert hasattr(module, name)


def test_schedules_does_not_export_its_imports():
    names = {}
    exec("from fusedopt.schedules import *", names)
    assert "annotations" not in dir(schedules) and "math" not in dir(schedules)
    assert set(names) - {"__builtins__"} == set(schedules.__all__)


def test_package_is_typed():
    assert (Path(fo.__file__).parent / "py.typed").is_file()


def test_python_m_fusedopt_prints_the_build():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(fo.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "fusedopt"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"fusedopt {fo.__version__} ")
    assert f"instruction set {fo._cpu.get_isa()}" in out
    assert f"{fo.get_num_threads()} threads" in out
    built = __import__("importlib").util.find_spec("fusedopt._cuda") is not None
    assert ("CUDA module: built" in out) == built
    assert ("CUDA module: not built" in out) == (not built)
    assert "python -m fusedopt.bench" in out


@pytest.mark.parametrize("module", DOCUMENTED + [_precision, fo],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    """The Examples sections are run and their printed results compared (doctest)."""
    import doctest

    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    if module is not fo:
        assert tests, f"{module.__name__} has no examples"
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} example(s) of {module.__name__} failed"
