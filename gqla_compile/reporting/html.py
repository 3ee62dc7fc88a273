"""The HTML renderer: one self-contained page (inline CSS and SVG) made from the report's plain data."""

from __future__ import annotations

import html
from typing import Any

from ..paths import form_text
from .phrases import (PATH_HEADERS, cache_rows, closing_lines, dry_run_text, headline, layer_rows, modules_text,
                      ops_rows, path_rows)
from .roofline_chart import roofline_svg

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#1d2433;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d0d7e2}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #d0d7e2;padding:.25em .6em;text-align:left}th{background:#eef2f8}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em}
.add{color:#116329}.del{color:#a40e26}.hunk{color:#6639ba}
.note{color:#57606a}summary{cursor:pointer;font-weight:600}
svg text{font-family:system-ui,Helvetica,Arial,sans-serif}
"""


def _table(rows: list[list], headers: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _diff(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = ("add" if line.startswith("+") else "del" if line.startswith("-")
               else "hunk" if line.startswith("@@") else "")
        text = html.escape(line)
        lines.append(f'<span class="{cls}">{text}</span>' if cls else text)
    return "<pre>" + "\n".join(lines) + "</pre>"


def render_html(data: dict[str, Any]) -> str:
    """The whole page; a model without latent attention gets the reason instead of the tables."""
    body = [f"<h1>gqla_compile report: {html.escape(str(data.get('model')))}{dry_run_text(data)}</h1>"]
    if not data.get("latent_attention"):
        body.append(f"<p>No latent attention: {html.escape(str(data.get('message')))}</p>")
    else:
        body += _overview(data)
        for group in data["layers"]:
            body += _layer_group(group)
        body += _whole_model(data)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>gqla_compile report: {html.escape(str(data.get('model')))}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _overview(data: dict[str, Any]) -> list[str]:
    """Headline, plan, the paths' costs with the roofline, and the layers table."""
    target, plan = data["target"], data["plan"]
    layers = [[", ".join(g["modules"]), *row[1:], g["traced_by"]] for row, g in zip(layer_rows(data), data["layers"])]
    return [f"<p>{html.escape(headline(data))}</p>",
            f"<p><b>plan:</b> {html.escape(plan['reason'])}</p>",
            "<h2>Paths</h2>",
            _table(path_rows(data), PATH_HEADERS),
            f'<p class="note">s_q={plan["s_q"]}, batch {plan["batch_size"]}, context {plan["context_len"]}, '
            f'tp={plan["tp"]}; ridge {target["ridge"]:.1f} FLOP/B</p>',
            roofline_svg(data),
            "<h2>Layers</h2>",
            _table(layers, ["module(s)", "count", "dims", "attention", "sparse", "path", "verify err", "traced by"])]


def _layer_group(g: dict[str, Any]) -> list[str]:
    """One group of identical layers: all op counts, weight matmuls, folded weights, forms, cache and diff."""
    matmuls = [[m["graph"], m["op"], m["weight"], str(m["shape"])]
               for m in g["matmul_weights_before"] + g["matmul_weights_after"]]
    parts = [f"<h2>Graph diff: {html.escape(modules_text(g['modules']))} (x{g['count']})</h2>",
             _table(ops_rows(g["ops_before"], g["ops_after"], changed_only=False), ["op", "before", "after", "change"]),
             "<p>Matmuls on weights (captured = before; projection and core = after):</p>",
             _table(matmuls, ["graph", "op", "weight", "shape"]),
             "<p>Folded weights:</p>",
             _table([[k, str(v)] for k, v in g["folded_weights"].items()], ["weight", "shape"])]
    if g.get("compute_forms"):
        parts.append(f"<p>Compute form per call: {html.escape(form_text(g['compute_forms']))}</p>")
    c = g["cache"]
    parts.append(_table([["before", c["layout_before"], c["elements_before"], c["bytes_before"]],
                         ["after", c["layout_after"], c["elements_after"], c["bytes_after"]]],
                        ["cache", "layout", "elements/token/layer", "bytes/token/layer"]))
    parts.append(f"<details><summary>unified diff of the graph code</summary>{_diff(g['diff'])}</details>")
    return parts


def _whole_model(data: dict[str, Any]) -> list[str]:
    cache = data["cache"]
    return ["<h2>Cache, whole model</h2>",
            _table(cache_rows(data),
                   ["cache", "per token", f"total (context {cache['context_len']}, batch {cache['batch_size']})"]),
            "<h2>Compile and skipped blocks</h2>",
            "".join(f"<p>{html.escape(line)}</p>" for line in closing_lines(data))]
