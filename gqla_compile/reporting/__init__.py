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

from ..errors import ReportError
from .document import SCHEMA_VERSION, Report
from .facts import report
from .html import render_html
from .roofline import roofline_svg

__all__ = ["Report", "report"]
