"""The graph-diff report: what ``optimize`` found, chose and changed, per layer, built from its records.

``report(model)`` reads ``model.gqla_optimization`` (the pass records, the plan, the installed runtimes);
``report(model, target=...)`` on a model that was not optimized is a dry run on a deep copy (the model is
left untouched). The :class:`Report` holds plain data only (JSON types), so ``to_json`` / ``from_json``
round-trip exactly; ``str()`` renders terminal tables, ``to_markdown()`` Markdown and ``to_html(path)``
one self-contained HTML file with a roofline chart drawn as inline SVG.

Identical layers (same dims, path and op histograms) are folded into one row with a count.
"""

from __future__ import annotations

import copy
import difflib
import html
import json
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import NoLatentAttentionError, NoLatentAttentionWarning, ReportError
from .paths import CORE_TRACE_CONTEXT, ORIGINAL_CACHE_LAYOUT, PATHS, form_text
from .units import binary_bytes, duration, si

logger = logging.getLogger(__name__)

__all__ = ["Report", "report"]

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------- Report


@dataclass
class Report:
    """The graph-diff report of one optimized (or dry-run) model: plain JSON data plus renderers."""

    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = json.loads(json.dumps(_plain(self.data), sort_keys=True))  # JSON types only

    # ---- accessors
    @property
    def layers(self) -> list[dict[str, Any]]:
        """One row per group of identical layers."""
        return self.data.get("layers", [])

    @property
    def path(self) -> str | None:
        return self.data.get("path")

    @property
    def has_latent_attention(self) -> bool:
        return bool(self.data.get("latent_attention"))

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.data, sort_keys=True, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"not a gqla_compile report (schema {SCHEMA_VERSION}) JSON document")
        return cls(data)

    # ---- rendering
    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, *, verbose: bool = False) -> str:
        """Terminal tables; ``verbose`` adds the full op histograms and the unified graph diff."""
        return "\n\n".join(_sections(self.data, "simple", verbose=verbose, markdown=False))

    def to_markdown(self) -> str:
        return "\n\n".join(_sections(self.data, "github", verbose=True, markdown=True)) + "\n"

    def to_html(self, path: str | Path) -> Path:
        """Write one self-contained HTML file (inline CSS and SVG, no external assets); returns its path."""
        path = Path(path)
        path.write_text(render_html(self.data), encoding="utf-8")
        return path


# --------------------------------------------------------------------------------------------- building


def report(model: nn.Module, target: Any = None, **optimize_kwargs: Any) -> Report:
    """The graph-diff report of ``model``.

    On an optimized model (``gqla_compile.optimize`` was run on it) the report reads its records. On a
    model that was not optimized, ``target=`` makes it a dry run: a deep copy is optimized with
    ``compile=False`` (and ``optimize_kwargs``: path, s_q, batch_size, context_len, ...) and reported on;
    the model itself is not changed.
    """
    state = getattr(model, "gqla_optimization", None)
    dry_run = False
    if state is None:
        if target is None:
            raise ReportError(
                f"{type(model).__name__} was not optimized: call gqla_compile.optimize(model, target=...) first, "
                "or pass target= for a dry run (report(model, target='h100') optimizes a copy)"
            )
        from .pipeline import optimize

        optimize_kwargs.setdefault("compile", False)
        subject = copy.deepcopy(model)
        dry_run = True
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NoLatentAttentionWarning)
                optimize(subject, target=target, **optimize_kwargs)
        except NoLatentAttentionError as exc:
            return _no_latent_report(model, str(exc), target, dry_run)
        for warning in caught:  # optimize's own warning says why nothing matched: the report says it instead
            if not issubclass(warning.category, NoLatentAttentionWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        state = getattr(subject, "gqla_optimization", None)
        if state is None:
            reasons = [str(w.message) for w in caught if issubclass(w.category, NoLatentAttentionWarning)]
            return _no_latent_report(model, reasons[-1] if reasons else None, target, dry_run)
    else:
        subject = model
        if target is not None:
            logger.info("the model is already optimized; reporting its optimization, not a new one for %s", target)
    return _build(subject, state, dry_run)


def _no_latent_report(model: nn.Module, message: str | None, target: Any, dry_run: bool) -> Report:
    message = message or (
        f"{type(model).__name__} holds no latent attention: nothing was rewritten. "
        "Convert a GQA model with gqla_compile.convert first"
    )
    return Report({
        "schema": SCHEMA_VERSION,
        "model": type(model).__name__,
        "dry_run": dry_run,
        "latent_attention": False,
        "message": message,
        "target": {"name": getattr(target, "name", str(target))},
        "path": None,
        "layers": [],
        "skipped": [],
        "compile": None,
    })


def _build(model: nn.Module, state: Any, dry_run: bool) -> Report:
    plan = state.plan
    dtype = plan.dtype
    from .targets import DTYPE_BYTES

    dtype_bytes = DTYPE_BYTES.get(dtype, 4)
    rows = [_layer_row(layer, dtype_bytes) for layer in state.layers]
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = json.dumps([row["dims"], row["path"], row["ops_before"], row["ops_after"]], sort_keys=True)
        if key not in groups:
            groups[key] = {**row, "count": 0, "modules": [], "layer_indices": [], "verification_error": None}
        group = groups[key]
        group["count"] += 1
        group["modules"].append(row["module"])
        group["layer_indices"].append(row["layer_idx"])
        error = row["verification_error"]
        if error is not None:
            group["verification_error"] = max(error, group["verification_error"] or 0.0)
    layers = []
    for group in groups.values():
        group.pop("module"), group.pop("layer_idx")
        layers.append(group)

    num_layers = len(state.layers)
    per_token_before = sum(r["cache"]["bytes_before"] for r in rows)
    per_token_after = sum(r["cache"]["bytes_after"] for r in rows)
    tokens = plan.context_len * plan.batch_size
    compile_stats = state.compile.to_dict() if state.compile is not None else None
    return Report({
        "schema": SCHEMA_VERSION,
        "model": type(model).__name__,
        "dry_run": dry_run,
        "latent_attention": True,
        "message": None,
        "path": state.path,
        "target": {
            "name": plan.target.name,
            "dtype": dtype,
            "peak_flops": plan.peak_flops,
            "memory_bandwidth": plan.target.memory_bandwidth,
            "ridge": plan.ridge,
        },
        "plan": _plan_section(plan),
        "layers": layers,
        "rewritten_layers": num_layers,
        "cache": {
            "dtype": dtype,
            "dtype_bytes": dtype_bytes,
            "context_len": plan.context_len,
            "batch_size": plan.batch_size,
            "bytes_per_token_before": per_token_before,  # all rewritten layers together
            "bytes_per_token_after": per_token_after,
            "bytes_before": per_token_before * tokens,
            "bytes_after": per_token_after * tokens,
        },
        "compile": compile_stats,
        "tensor_parallel": {"tp": state.tp, "rank": state.rank, "sharding": dict(state.tp_sharding)},
        "skipped": [{"module": m, "reason": r} for m, r in state.skipped],
        "seconds": round(float(state.seconds), 3),
    })


def _plan_section(plan: Any) -> dict[str, Any]:
    paths = {}
    for name, cost in plan.costs.items():
        core = cost.part("attention_core")
        paths[name] = {
            "step_time_s": cost.step_time_s,
            "layer_time_s": cost.time_s,
            "bytes": cost.bytes,
            "flops": cost.flops,
            "arithmetic_intensity": cost.arithmetic_intensity,
            "bound": cost.bound,
            "cache_bytes_per_token": cost.cache_bytes_per_token,
            "core": {"bytes": core.bytes, "flops": core.flops, "time_s": core.time_s,
                     "arithmetic_intensity": core.arithmetic_intensity, "bound": core.bound},
        }
    return {
        "path": plan.path,
        "reason": plan.reason,
        "s_q": plan.s_q,
        "batch_size": plan.batch_size,
        "context_len": plan.context_len,
        "tp": plan.tp,
        "rope_key": plan.rope_key,
        "output_absorption": plan.output_absorption,
        "top_k": getattr(plan, "top_k", None),
        "forms": dict(getattr(plan, "forms", {})),
        "paths": paths,
    }


def _layer_row(layer: Any, dtype_bytes: int) -> dict[str, Any]:
    """One layer's row, from the facts optimize kept: its pass records, the path's description and the
    core trace the path emitted."""
    records = {r.pass_name: r for r in layer.records}
    detect = records.get("detect")
    final = layer.records[-1]
    decode_path = PATHS[layer.path]
    core = layer.core
    ops_projection = dict(final.ops_after)
    ops_core = dict(core.ops) if core else {}
    code_before = detect.code_before if detect else ""
    code_after = final.code_after.strip("\n")
    if core is not None:
        code_after += (f"\n\n# attention core at decode (make_fx, 1 query token, {CORE_TRACE_CONTEXT} cached tokens)\n"
                       + core.code.strip("\n"))
    folded: dict[str, list[int]] = {}
    absorption: dict[str, Any] = {}
    for record in layer.records:
        summary = record.summary
        folded.update({k: list(v) for k, v in summary.get("folded_weights", {}).items()})
        absorption.update({k: summary[k] for k in ("query_absorption", "output_absorption") if k in summary})
    detect_summary = detect.summary if detect else {}
    elements_before, elements_after = layer.cache_elements_before, layer.cache_elements_after
    per_rank = layer.cache_elements_per_rank if layer.cache_elements_per_rank is not None else elements_after
    error = layer.verification_error
    return {
        "module": layer.module_path,
        "layer_idx": layer.layer_idx,
        "dims": layer.dims.as_dict(),
        "path": layer.path,
        "traced_by": layer.traced_by,
        "attention": detect_summary.get("attention"),
        "sparse": detect_summary.get("sparse"),  # the token selection (k, its source), None: dense
        "verification_error": None if error is None or math.isnan(error) else float(error),
        "projections": detect_summary.get("weights", {}),
        "ops_before": dict(detect.ops_before) if detect else {},
        "ops_after": dict(Counter(ops_projection) + Counter(ops_core)),
        "ops_after_projection": ops_projection,
        "ops_after_core": ops_core,
        "matmul_weights_before": [{"graph": "captured", **m} for m in layer.matmul_weights_before],
        "matmul_weights_after": list(layer.matmul_weights_after),
        "folded_weights": folded,
        "absorption": absorption,
        "removed": (records["split"].summary.get("removed", {}) if "split" in records else {}),
        "passes": [{"name": r.pass_name, "uuid": r.uuid, "seconds": round(r.seconds, 4)} for r in layer.records],
        "diff": "\n".join(difflib.unified_diff(
            code_before.strip("\n").splitlines(), code_after.splitlines(),
            "before: captured attention graph (" + final.module_path + ")",
            "after: projection graph + attention core", lineterm="")),
        "compute_forms": dict(layer.compute_forms),
        "cache": {
            "layout_before": ORIGINAL_CACHE_LAYOUT,
            "layout_after": decode_path.cache_layout,
            "elements_before": elements_before,
            "elements_after": elements_after,
            "bytes_before": elements_before * dtype_bytes,
            "bytes_after": elements_after * dtype_bytes,
            "elements_per_rank": per_rank,
            "bytes_per_rank": per_rank * dtype_bytes,
        },
    }


def _plain(value: Any) -> Any:
    """JSON-native copy: tuples to lists, NaN/inf to None, torch sizes to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, torch.Size)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------------------------- text


def _dims_text(d: dict) -> str:
    q = f", q_lora={d['q_lora_rank']}" if d.get("q_lora_rank") else ""
    return f"n_h={d['n_h']} n_g={d['n_g']} d_c={d['d_c']} d_R={d['d_R']} d_n={d['d_n']} d_v={d['d_v']}{q}"


def _sparse_text(sparse: dict | None) -> str:
    """The layers table's sparse column: dense, an indexer's top-k, or a selection another block made."""
    if not sparse:
        return "dense"
    if sparse.get("top_k") is None:
        return "sparse (top-k from " + sparse["selection"].removeprefix("a ") + ")"
    return f"sparse (indexer top-{sparse['top_k']})"


def _modules_text(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else f"{modules[0]} .. {modules[-1]}"


def _ops_rows(before: dict, after: dict, *, changed_only: bool) -> list[list]:
    rows = []
    for op in sorted(set(before) | set(after)):
        b, a = before.get(op, 0), after.get(op, 0)
        if changed_only and a == b:
            continue
        rows.append([op, b, a, f"{a - b:+d}"])
    return rows


def _weights_text(items: list[dict]) -> str:
    return ", ".join(f"{m['op']}({m['weight']} {list(m['shape'])})" for m in items) or "-"


def _sections(data: dict, fmt: str, *, verbose: bool, markdown: bool) -> list[str]:
    from tabulate import tabulate

    def table(rows, headers):
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def title(text):
        return f"### {text}" if markdown else f"{text}\n{'-' * len(text)}"

    head = "# gqla_compile report" if markdown else "gqla_compile report"
    kind = " (dry run on a copy)" if data.get("dry_run") else ""
    if not data.get("latent_attention"):
        return [f"{head}: {data.get('model')}{kind}", f"No latent attention: {data.get('message')}"]
    target, plan, cache = data["target"], data["plan"], data["cache"]
    out = [f"{head}: {data['model']}{kind} on {target['name']} ({target['dtype']}): {data['path']} path, "
           f"{data['rewritten_layers']} attention block(s) rewritten",
           f"plan: {plan['reason']}"]

    rows = []
    for name, p in plan["paths"].items():
        rows.append([f"{name} *" if name == data["path"] else name, duration(p["step_time_s"]),
                     duration(p["layer_time_s"]), f"{p['core']['arithmetic_intensity']:.1f}",
                     f"{p['arithmetic_intensity']:.1f}", p["bound"], f"{p['cache_bytes_per_token']} B"])
    sparse = f", sparse: top-{plan['top_k']} tokens per query" if plan.get("top_k") else ""
    out.append(title(f"paths (s_q={plan['s_q']}, batch {plan['batch_size']}, context {plan['context_len']}{sparse}, "
                     f"ridge {target['ridge']:.0f} FLOP/B)") + "\n"
               + table(rows, ["path", "step time", "per layer", "core AI", "total AI", "bound", "cache/token/layer"]))

    rows = []
    for g in data["layers"]:
        err = g["verification_error"]
        rows.append([_modules_text(g["modules"]), g["count"], _dims_text(g["dims"]), g["attention"] or "-",
                     _sparse_text(g.get("sparse")), g["path"], "-" if err is None else f"{err:.1e}"])
    out.append(title("layers") + "\n" + table(rows, ["module(s)", "count", "dims", "attention", "sparse", "path",
                                                   "verify err"]))

    for index, g in enumerate(data["layers"]):
        label = f"graph diff: {_modules_text(g['modules'])} (x{g['count']})"
        rows = _ops_rows(g["ops_before"], g["ops_after"], changed_only=not verbose)
        parts = [title(label), table(rows, ["op", "before", "after", "change"])]
        parts.append("matmuls on weights before: " + _weights_text(g["matmul_weights_before"]))
        parts.append("matmuls on weights after:  " + _weights_text(g["matmul_weights_after"]))
        folded = ", ".join(f"{k} {v}" for k, v in g["folded_weights"].items()) or "-"
        parts.append(f"folded weights: {folded}")
        if g.get("absorption"):
            parts.append("absorption: " + ", ".join(f"{k}={v}" for k, v in sorted(g["absorption"].items())))
        if g.get("compute_forms"):
            parts.append("compute form per call: " + form_text(g["compute_forms"]))
        c = g["cache"]
        parts.append(f"cache per token and layer: {c['elements_before']} -> {c['elements_after']} elements "
                     f"({c['bytes_before']} -> {c['bytes_after']} B); after: {c['layout_after']}")
        parallel = data.get("tensor_parallel") or {}
        if parallel.get("tp", 1) > 1:
            parts.append(f"per tensor-parallel rank ({parallel['tp']} ranks): {c['elements_per_rank']} elements "
                         f"({c['bytes_per_rank']} B) per token and layer")
        if verbose:
            parts.append(f"traced by: {g['traced_by']}")
            parts.append("passes: " + ", ".join(f"{p['name']} ({p['seconds'] * 1e3:.1f} ms, uuid {p['uuid']})"
                                                for p in g["passes"]))
            diff = g["diff"] or "(no change)"
            parts.append(f"<details><summary>unified diff of the graph code</summary>\n\n```diff\n{diff}\n```\n\n</details>"
                         if markdown else diff)
        out.append("\n".join(parts))

    out.append(title(f"cache (whole model: {data['rewritten_layers']} layers, context {cache['context_len']}, "
                     f"batch {cache['batch_size']}, {cache['dtype']})") + "\n" + table(
        [["before (unmodified model)", f"{cache['bytes_per_token_before']} B", binary_bytes(cache["bytes_before"])],
         [f"after ({data['path']})", f"{cache['bytes_per_token_after']} B", binary_bytes(cache["bytes_after"])]],
        ["cache", "per token", "total"]))

    comp = data.get("compile")
    if comp is None:
        out.append("compile: not compiled (compile=False: rewritten graphs run eagerly)")
    else:
        sizes = ", ".join(str(s) for s in comp.get("graph_sizes", [])) or "-"
        out.append(f"compile: {comp['backend']}, {comp['graphs']} graph(s) compiled in {comp['seconds']:.2f} s "
                   f"(nodes per graph: {sizes}), {comp['graph_breaks']} graph break(s)"
                   + ("; graphs compile lazily on the first calls" if comp["graphs"] == 0 else ""))
        fallbacks = comp.get("eager_fallbacks") or []
        if fallbacks:
            out[-1] += (f"; FELL BACK TO EAGER on {len(fallbacks)} call(s), those calls ran uncompiled: "
                        + "; ".join(dict.fromkeys(fallbacks)))
    parallel = data.get("tensor_parallel") or {}
    if parallel.get("tp", 1) > 1:
        out.append(f"tensor parallel: {parallel['tp']} ranks (this is rank {parallel['rank']}); "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(parallel["sharding"].items())))
    skipped = data.get("skipped") or []
    out.append("skipped: " + ("; ".join(f"{s['module']} ({s['reason']})" for s in skipped) if skipped else "nothing"))
    return out


# --------------------------------------------------------------------------------------------- HTML

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


def _html_table(rows: list[list], headers: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_diff(diff: str) -> str:
    lines = []
    for line in diff.splitlines():
        cls = ("add" if line.startswith("+") else "del" if line.startswith("-")
               else "hunk" if line.startswith("@@") else "")
        text = html.escape(line)
        lines.append(f'<span class="{cls}">{text}</span>' if cls else text)
    return "<pre>" + "\n".join(lines) + "</pre>"


def roofline_svg(data: dict, width: int = 720, height: int = 440) -> str:
    """Log-log roofline of the target (bandwidth slope, peak line, ridge) with both paths' operating points."""
    target, plan = data["target"], data["plan"]
    peak, bandwidth, ridge = target["peak_flops"], target["memory_bandwidth"], target["ridge"]
    points = []
    for name, p in plan["paths"].items():
        for kind, figures in (("core", p["core"]), ("total", {"flops": p["flops"], "bytes": p["bytes"],
                                                              "time_s": p["layer_time_s"]})):
            if figures["bytes"] and figures["flops"] and figures["time_s"]:
                points.append((name, kind, figures["flops"] / figures["bytes"], figures["flops"] / figures["time_s"]))
    intensities = [ridge] + [p[2] for p in points]
    x_lo = 10 ** math.floor(math.log10(min(intensities) / 2))
    x_hi = 10 ** math.ceil(math.log10(max(intensities) * 4))
    y_hi = 10 ** math.ceil(math.log10(peak * 1.5))
    y_lo = 10 ** math.floor(math.log10(min([x_lo * bandwidth] + [p[3] for p in points]) / 2))
    left, right, top, bottom = 80, 20, 30, 60
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + pw * (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))

    def sy(y):
        return top + ph * (1 - (math.log10(y) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo)))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="roofline" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="roofline chart">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfcfe" stroke="#8c959f"/>']
    for e in range(round(math.log10(x_lo)), round(math.log10(x_hi)) + 1):
        x = sx(10 ** e)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e3e8ef"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">1e{e}</text>')
    for e in range(round(math.log10(y_lo)), round(math.log10(y_hi)) + 1):
        y = sy(10 ** e)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e3e8ef"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">1e{e}</text>')
    x0 = max(x_lo, y_lo / bandwidth)
    roof = [(x0, x0 * bandwidth), (ridge, peak), (x_hi, peak)]
    parts.append('<polyline class="roof" fill="none" stroke="#0969da" stroke-width="2.5" points="'
                 + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in roof) + '"/>')
    parts.append(f'<line x1="{sx(ridge):.1f}" y1="{sy(peak):.1f}" x2="{sx(ridge):.1f}" y2="{top + ph}" '
                 'stroke="#0969da" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{sx(ridge) + 4:.1f}" y="{top + ph - 6}" font-size="11" fill="#0969da">'
                 f'ridge {ridge:.1f} FLOP/B</text>')
    parts.append(f'<text x="{sx(x_hi) - 6:.1f}" y="{sy(peak) - 6:.1f}" font-size="11" text-anchor="end" '
                 f'fill="#0969da">peak {si(peak, "FLOP/s")}</text>')
    parts.append(f'<text x="{sx(x0) + 6:.1f}" y="{sy(x0 * bandwidth) - 8:.1f}" font-size="11" fill="#0969da">'
                 f'{si(bandwidth, "B/s")}</text>')
    colours = {"absorbed": "#cf222e", "grouped": "#1a7f37"}
    for index, (name, kind, ai, achieved) in enumerate(points):
        x, y = sx(ai), sy(achieved)
        colour = colours.get(name, "#6639ba")
        chosen = " (chosen)" if name == data["path"] else ""
        shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colour}"/>' if kind == "core" else
                 f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="none" stroke="{colour}" '
                 'stroke-width="2"/>')
        parts.append(f'<g class="point" data-path="{name}" data-kind="{kind}">{shape}'
                     f'<text x="{x + 9:.1f}" y="{y + (12 if index % 2 else -8):.1f}" font-size="12" fill="{colour}">'
                     f'{html.escape(name)} {kind}{chosen}</text></g>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 18}" font-size="13" text-anchor="middle">'
                 'arithmetic intensity (FLOP/B)</text>')
    parts.append(f'<text x="18" y="{top + ph / 2:.0f}" font-size="13" text-anchor="middle" '
                 f'transform="rotate(-90 18 {top + ph / 2:.0f})">attainable FLOP/s</text>')
    parts.append(f'<text x="{left}" y="18" font-size="13" font-weight="600">roofline of {html.escape(target["name"])} '
                 f'({html.escape(target["dtype"])}): circles attention core, squares whole step per layer</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(data: dict) -> str:
    kind = " (dry run on a copy)" if data.get("dry_run") else ""
    body = [f"<h1>gqla_compile report: {html.escape(str(data.get('model')))}{kind}</h1>"]
    if not data.get("latent_attention"):
        body.append(f"<p>No latent attention: {html.escape(str(data.get('message')))}</p>")
    else:
        sections = _sections(data, "simple", verbose=False, markdown=False)
        target, plan, cache = data["target"], data["plan"], data["cache"]
        body.append(f"<p>{html.escape(sections[0].split(': ', 1)[1])}</p>")
        body.append(f"<p><b>plan:</b> {html.escape(plan['reason'])}</p>")
        body.append("<h2>Paths</h2>")
        rows = [[f"{n} *" if n == data["path"] else n, duration(p["step_time_s"]), duration(p["layer_time_s"]),
                 f"{p['core']['arithmetic_intensity']:.1f}", f"{p['arithmetic_intensity']:.1f}", p["bound"],
                 f"{p['cache_bytes_per_token']} B"] for n, p in plan["paths"].items()]
        body.append(_html_table(rows, ["path", "step time", "per layer", "core AI", "total AI", "bound",
                                       "cache/token/layer"]))
        body.append(f'<p class="note">s_q={plan["s_q"]}, batch {plan["batch_size"]}, context {plan["context_len"]}, '
                    f'tp={plan["tp"]}; ridge {target["ridge"]:.1f} FLOP/B</p>')
        body.append(roofline_svg(data))
        body.append("<h2>Layers</h2>")
        rows = [[", ".join(g["modules"]), g["count"], _dims_text(g["dims"]), g["attention"] or "-",
                 _sparse_text(g.get("sparse")), g["path"],
                 "-" if g["verification_error"] is None else f"{g['verification_error']:.1e}", g["traced_by"]]
                for g in data["layers"]]
        body.append(_html_table(rows, ["module(s)", "count", "dims", "attention", "sparse", "path", "verify err",
                                       "traced by"]))
        for g in data["layers"]:
            body.append(f"<h2>Graph diff: {html.escape(_modules_text(g['modules']))} (x{g['count']})</h2>")
            body.append(_html_table(_ops_rows(g["ops_before"], g["ops_after"], changed_only=False),
                                    ["op", "before", "after", "change"]))
            rows = [[m["graph"], m["op"], m["weight"], str(m["shape"])]
                    for m in g["matmul_weights_before"] + g["matmul_weights_after"]]
            body.append("<p>Matmuls on weights (captured = before; projection and core = after):</p>")
            body.append(_html_table(rows, ["graph", "op", "weight", "shape"]))
            body.append("<p>Folded weights:</p>")
            body.append(_html_table([[k, str(v)] for k, v in g["folded_weights"].items()], ["weight", "shape"]))
            if g.get("compute_forms"):
                body.append(f"<p>Compute form per call: {html.escape(form_text(g['compute_forms']))}</p>")
            c = g["cache"]
            body.append(_html_table([["before", c["layout_before"], c["elements_before"], c["bytes_before"]],
                                     ["after", c["layout_after"], c["elements_after"], c["bytes_after"]]],
                                    ["cache", "layout", "elements/token/layer", "bytes/token/layer"]))
            body.append(f"<details><summary>unified diff of the graph code</summary>{_html_diff(g['diff'])}</details>")
        body.append("<h2>Cache, whole model</h2>")
        body.append(_html_table(
            [["before (unmodified model)", f"{cache['bytes_per_token_before']} B", binary_bytes(cache["bytes_before"])],
             [f"after ({data['path']})", f"{cache['bytes_per_token_after']} B", binary_bytes(cache["bytes_after"])]],
            ["cache", "per token", f"total (context {cache['context_len']}, batch {cache['batch_size']})"]))
        body.append("<h2>Compile and skipped blocks</h2>")
        tail = [text for text in sections if text.startswith(("compile:", "tensor parallel:", "skipped:"))]
        body.append("".join(f"<p>{html.escape(text)}</p>" for text in tail))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>gqla_compile report: {html.escape(str(data.get('model')))}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
