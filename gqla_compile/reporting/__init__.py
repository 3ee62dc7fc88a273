"""The graph-diff report: what ``optimize`` found, chose and changed, per layer, built from its records.

``report(model)`` reads ``model.gqla_optimization`` (the pass records, the plan, the installed runtimes);
``report(model, target=...)`` on a model that was not optimized is a dry run on a deep copy (the model is
left untouched). The :class:`Report` holds plain data only (JSON types), so ``to_json`` / ``from_json``
round-trip exactly; ``str()`` renders terminal tables, ``to_markdown()`` Markdown and ``to_html(path)``
one self-contained HTML file with a roofline chart drawn as inline SVG.

One concern per module: ``facts`` builds the plain data from the optimization's records, ``document`` holds
it (:class:`Report`), ``text`` renders terminal tables and Markdown, ``html`` and ``roofline`` the HTML page
from the same data, and ``phrases`` holds the wording the renderers share.
"""

from __future__ import annotations

# ReportError, SCHEMA_VERSION and the renderers stay importable from here, as from the former reporting.py
from ..errors import ReportError  # noqa: F401
from .document import SCHEMA_VERSION, Report  # noqa: F401
from .facts import report
from .html import render_html  # noqa: F401
from .roofline_chart import roofline_svg  # noqa: F401

__all__ = ["Report", "report"]
