"""Sphinx configuration of fusedopt's documentation.

    pip install ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

The API pages document what each module exports (its ``__all__``), from the docstrings
(numpydoc style, read by napoleon). The topic pages are Markdown (MyST).
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The installed fusedopt; else the source tree's, where a development build puts the
# compiled modules (see README.md, "Build options").
if importlib.util.find_spec("fusedopt") is None:
    sys.path.insert(0, str(ROOT / "python"))

import fusedopt  # noqa: E402

project = "fusedopt"
author = "fusedopt developers"
copyright = "fusedopt developers"
release = version = fusedopt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# numpydoc-style docstrings
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True  # "Attributes" as fields: no second entry beside autodoc's
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True}
# fusedopt.torch subclasses torch.optim.Optimizer; without torch, document it anyway
autodoc_mock_imports = [] if importlib.util.find_spec("torch") else ["torch"]

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

html_theme = "alabaster"
html_title = f"fusedopt {release}"
