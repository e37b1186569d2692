"""The documentation builds (Sphinx, warnings as errors), and the API pages hold what the
modules export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="sphinx is not installed (pip install '.[docs]' or "
                                     "'.[test]' brings it)")
pytest.importorskip("myst_parser", reason="myst-parser is not installed (pip install "
                                          "'.[docs]' or '.[test]' brings it)")

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    import fusedopt

    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ)
    # the fusedopt under test, installed or a development build
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [os.path.dirname(os.path.dirname(fusedopt.__file__)),
                      env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html",
         "-d", str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, "sphinx-build failed:\n" + proc.stdout + proc.stderr
    return out


def test_docs_build_without_warnings(html):
    assert (html / "index.html").is_file()
    for page in ("getting_started", "torch", "mixed_precision", "gpu", "distributed",
                 "second_order", "benchmarks"):
        assert (html / f"{page}.html").is_file(), page


@pytest.mark.parametrize("module", ["fusedopt", "fusedopt.functional", "fusedopt.torch",
                                    "fusedopt.batched", "fusedopt.schedules",
                                    "fusedopt.transfer", "fusedopt.amp", "fusedopt.reference"])
def test_api_page_lists_every_export(html, module):
    import importlib

    mod = importlib.import_module(module)
    text = (html / "api" / f"{module.split('.')[-1]}.html").read_text(encoding="utf-8")
    for name in mod.__all__:
        obj = getattr(mod, name)
        if type(obj).__name__ == "module" or name in ("LBFGS", "Newton"):
            continue
        assert f'id="{module}.{name}"' in text, f"{module}.{name} is not documented"


def test_second_order_page(html):
    text = (html / "api" / "second_order.html").read_text(encoding="utf-8")
    assert 'id="fusedopt.LBFGS"' in text and 'id="fusedopt.Newton"' in text
    assert 'id="fusedopt.Newton.step"' in text
