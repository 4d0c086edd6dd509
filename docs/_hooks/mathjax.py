"""MkDocs hook: serve MathJax from a local copy, so the site builds and renders math offline.

MathJax comes from the ``django-static-mathjax`` wheel on PyPI (a plain data package, no Django
needed; it installs the MathJax 3 distribution as the ``mathjax`` package). The hook adds its
self-contained ``tex-svg.js`` (SVG output: glyphs are embedded, no font files) to the site as
``javascripts/vendor/mathjax/tex-svg.js``, the path ``mkdocs.yml`` loads. Nothing is fetched.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

SITE_PATH = "javascripts/vendor/mathjax/tex-svg.js"


def _mathjax_script() -> Path:
    spec = importlib.util.find_spec("mathjax")
    for root in (spec.submodule_search_locations or []) if spec else []:
        script = Path(root) / "static" / "mathjax" / "es5" / "tex-svg.js"
        if script.is_file():
            return script
    raise PluginError(
        "MathJax is not installed: the docs need a local copy to render math offline. "
        "Install the docs extras: pip install -e '.[docs]' (it includes django-static-mathjax)."
    )


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, SITE_PATH, abs_src_path=str(_mathjax_script())))
    return files
