"""The terminal and Markdown renderers: the report's plain data as tables (tabulate) and lines."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from ..paths import form_text
from .phrases import (LAYER_HEADERS, PATH_HEADERS, cache_rows, closing_lines, dry_run_text, headline, layer_rows,
                      modules_text, ops_rows, path_rows, weights_text)


class _Style:
    """How tables and titles look: a tabulate format, and Markdown headings or underlined titles."""

    def __init__(self, fmt: str, markdown: bool):
        self.fmt, self.markdown = fmt, markdown

    def table(self, rows: list[list], headers: list[str]) -> str:
        return tabulate(rows, headers=headers, tablefmt=self.fmt, disable_numparse=True)

    def title(self, text: str) -> str:
        return f"### {text}" if self.markdown else f"{text}\n{'-' * len(text)}"


def sections(data: dict[str, Any], fmt: str, *, verbose: bool, markdown: bool) -> list[str]:
    """The report as blocks of text (joined by blank lines): headline, plan, tables, one block per layer group."""
    style = _Style(fmt, markdown)
    head = "# gqla_compile report" if markdown else "gqla_compile report"
    if not data.get("latent_attention"):
        return [f"{head}: {data.get('model')}{dry_run_text(data)}", f"No latent attention: {data.get('message')}"]
    out = [f"{head}: {headline(data)}", f"plan: {data['plan']['reason']}", _paths(data, style),
           style.title("layers") + "\n" + style.table(layer_rows(data), LAYER_HEADERS)]
    out += [_layer_group(data, group, style, verbose=verbose) for group in data["layers"]]
    cache = data["cache"]
    out.append(style.title(f"cache (whole model: {data['rewritten_layers']} layers, context {cache['context_len']}, "
                           f"batch {cache['batch_size']}, {cache['dtype']})") + "\n"
               + style.table(cache_rows(data), ["cache", "per token", "total"]))
    return out + closing_lines(data)


def _paths(data: dict[str, Any], style: _Style) -> str:
    target, plan = data["target"], data["plan"]
    sparse = f", sparse: top-{plan['top_k']} tokens per query" if plan.get("top_k") else ""
    return (style.title(f"paths (s_q={plan['s_q']}, batch {plan['batch_size']}, context {plan['context_len']}"
                        f"{sparse}, ridge {target['ridge']:.0f} FLOP/B)") + "\n"
            + style.table(path_rows(data), PATH_HEADERS))


def _layer_group(data: dict[str, Any], g: dict[str, Any], style: _Style, *, verbose: bool) -> str:
    """One group of identical layers: its op changes, weight matmuls, folded weights, forms and cache."""
    rows = ops_rows(g["ops_before"], g["ops_after"], changed_only=not verbose)
    parts = [style.title(f"graph diff: {modules_text(g['modules'])} (x{g['count']})"),
             style.table(rows, ["op", "before", "after", "change"]),
             "matmuls on weights before: " + weights_text(g["matmul_weights_before"]),
             "matmuls on weights after:  " + weights_text(g["matmul_weights_after"]),
             "folded weights: " + (", ".join(f"{k} {v}" for k, v in g["folded_weights"].items()) or "-")]
    if g.get("absorption"):
        parts.append("absorption: " + ", ".join(f"{k}={v}" for k, v in sorted(g["absorption"].items())))
    if g.get("compute_forms"):
        parts.append("compute form per call: " + form_text(g["compute_forms"]))
    parts += _cache_lines(data, g["cache"])
    if verbose:
        parts += _verbose_lines(g, markdown=style.markdown)
    return "\n".join(parts)


def _cache_lines(data: dict[str, Any], c: dict[str, Any]) -> list[str]:
    lines = [f"cache per token and layer: {c['elements_before']} -> {c['elements_after']} elements "
             f"({c['bytes_before']} -> {c['bytes_after']} B); after: {c['layout_after']}"]
    parallel = data.get("tensor_parallel") or {}
    if parallel.get("tp", 1) > 1:
        lines.append(f"per tensor-parallel rank ({parallel['tp']} ranks): {c['elements_per_rank']} elements "
                     f"({c['bytes_per_rank']} B) per token and layer")
    return lines


def _verbose_lines(g: dict[str, Any], *, markdown: bool) -> list[str]:
    diff = g["diff"] or "(no change)"
    return [f"traced by: {g['traced_by']}",
            "passes: " + ", ".join(f"{p['name']} ({p['seconds'] * 1e3:.1f} ms, uuid {p['uuid']})" for p in g["passes"]),
            f"<details><summary>unified diff of the graph code</summary>\n\n```diff\n{diff}\n```\n\n</details>"
            if markdown else diff]
