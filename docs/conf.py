"""Sphinx configuration of hpcqn's documentation.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the hpcqn package of this tree, installed or not
sys.path.insert(0, str(DOCS / "_ext"))
# Importing hpcqn for autodoc must not start MPI (one process builds the site).
os.environ.setdefault("HPCQN_NO_MPI", "1")

import hpcqn  # noqa: E402

project = "hpcqn"
author = "the hpcqn developers"
copyright = "2026, the hpcqn developers"  # noqa: A001 - Sphinx's name
release = hpcqn.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "hpcqn_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: headings get anchors for cross-page links (`[text](page.md#anchor)`).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# autodoc: signatures with their type hints as written; members in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}
# The docstrings are NumPy style ("Parameters\n----------") in places and plain reST
# elsewhere: napoleon reads both.
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"hpcqn {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"
