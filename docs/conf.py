"""Sphinx configuration: numpydoc API reference and a sphinx-gallery of ../examples."""

import os
import re
import sys
import warnings

# Build against this checkout, not whichever skpatchcore is installed.
sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

import skpatchcore  # noqa: E402

project = "skpatchcore"
author = "skpatchcore developers"
copyright = "skpatchcore developers"
release = version = skpatchcore.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
]

exclude_patterns = ["_build", "design.md", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
templates_path = ["_templates"]
html_theme = "alabaster"
html_static_path = []

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
numpydoc_show_class_members = False  # autosummary pages list them
numpydoc_class_members_toctree = False

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # others (demo.py, mvtec_benchmark.py) are shown, not run
    "ignore_pattern": r"demo\.py",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "within_subsection_order": "FileNameSortKey",
}

# Third-party deprecation chatter must not fail a -W build.
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


_FITTED_NAME = re.compile(r"\b(n_\w+?)_(?=[,)])")


def _escape_fitted_names(app, what, name, obj, options, lines):
    # numpydoc type lines such as "bank_ : ndarray of shape (n_samples_fit_, D)" are
    # read as reST, where a trailing underscore makes a link target.
    for i, line in enumerate(lines):
        if " : " in line:
            lines[i] = _FITTED_NAME.sub(r"\1\\_", line)


def _skip_metadata_requests(app, what, name, obj, skip, options):
    # scikit-learn's generated set_*_request methods: routing plumbing, not our API.
    return True if re.fullmatch(r"set_\w+_request", name) else None


def setup(app):
    app.connect("autodoc-process-docstring", _escape_fitted_names)
    app.connect("autodoc-skip-member", _skip_metadata_requests)
