"""Sphinx configuration for cserver's documentation.

Build it, warnings as errors, with no network::

    python -m sphinx -W --keep-going -b html docs /tmp/docs_build
"""

import os
import sys

# autodoc imports the package from this checkout, installed or not.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import cserver  # noqa: E402

project = "cserver"
author = "the cserver authors"
copyright = "the cserver authors (MIT licence)"
version = release = cserver.__version__

extensions = [
    "sphinx.ext.autodoc",
]

# The site's pages; the rest of docs/ is not part of it.
exclude_patterns = ["_build"]
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}

# Optional extras: the pages build without them installed.  pyOpenSSL is
# not mocked: Twisted's endpoints module probes it at import time, and a
# mock makes that probe fail (without pyOpenSSL Twisted simply goes without
# TLS).
autodoc_mock_imports = ["prometheus_client"]
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}

# cserver's docstrings are reStructuredText; Twisted's, which overriding
# methods would inherit, are epytext: not inherited.
autodoc_inherit_docstrings = False


# Bundled with Sphinx: no theme to download.
html_theme = "alabaster"
html_theme_options = {
    "description": "an authenticated append-only message service on Twisted",
    "fixed_sidebar": False,
}
html_static_path = []
html_title = f"cserver {release}"

# No intersphinx and nothing else that reaches the network.

