"""The wording the text and HTML renderers share, each phrase made from the report's plain data."""

from __future__ import annotations

from typing import Any

from ..units import binary_bytes, duration


def dry_run_text(data: dict[str, Any]) -> str:
    return " (dry run on a copy)" if data.get("dry_run") else ""


def headline(data: dict[str, Any]) -> str:
    """What was optimized, for which target, on which path, and how many blocks were rewritten."""
    target = data["target"]
    return (f"{data['model']}{dry_run_text(data)} on {target['name']} ({target['dtype']}): {data['path']} path, "
            f"{data['rewritten_layers']} attention block(s) rewritten")


def dims_text(d: dict) -> str:
    q = f", q_lora={d['q_lora_rank']}" if d.get("q_lora_rank") else ""
    return f"n_h={d['n_h']} n_g={d['n_g']} d_c={d['d_c']} d_R={d['d_R']} d_n={d['d_n']} d_v={d['d_v']}{q}"


def sparse_text(sparse: dict | None) -> str:
    """The layers table's sparse column: dense, an indexer's top-k, or a selection another block made."""
    if not sparse:
        return "dense"
    if sparse.get("top_k") is None:
        return "sparse (top-k from " + sparse["selection"].removeprefix("a ") + ")"
    return f"sparse (indexer top-{sparse['top_k']})"


def modules_text(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else f"{modules[0]} .. {modules[-1]}"


def error_text(error: float | None) -> str:
    return "-" if error is None else f"{error:.1e}"


def ops_rows(before: dict, after: dict, *, changed_only: bool) -> list[list]:
    """One row per op: its count before, after, and the change."""
    rows = []
    for op in sorted(set(before) | set(after)):
        b, a = before.get(op, 0), after.get(op, 0)
        if changed_only and a == b:
            continue
        rows.append([op, b, a, f"{a - b:+d}"])
    return rows


def weights_text(items: list[dict]) -> str:
    return ", ".join(f"{m['op']}({m['weight']} {list(m['shape'])})" for m in items) or "-"


PATH_HEADERS = ["path", "step time", "per layer", "core AI", "total AI", "bound", "cache/token/layer"]
LAYER_HEADERS = ["module(s)", "count", "dims", "attention", "sparse", "path", "verify err"]


def path_rows(data: dict[str, Any]) -> list[list]:
    """The paths table: each path's modelled cost, the chosen one starred."""
    return [[f"{name} *" if name == data["path"] else name, duration(p["step_time_s"]), duration(p["layer_time_s"]),
             f"{p['core']['arithmetic_intensity']:.1f}", f"{p['arithmetic_intensity']:.1f}", p["bound"],
             f"{p['cache_bytes_per_token']} B"] for name, p in data["plan"]["paths"].items()]


def layer_rows(data: dict[str, Any]) -> list[list]:
    """The layers table: one row per group of identical layers."""
    return [[modules_text(g["modules"]), g["count"], dims_text(g["dims"]), g["attention"] or "-",
             sparse_text(g.get("sparse")), g["path"], error_text(g["verification_error"])] for g in data["layers"]]


def cache_rows(data: dict[str, Any]) -> list[list]:
    """The whole model's cache before and after, per token and in total."""
    cache = data["cache"]
    return [["before (unmodified model)", f"{cache['bytes_per_token_before']} B", binary_bytes(cache["bytes_before"])],
            [f"after ({data['path']})", f"{cache['bytes_per_token_after']} B", binary_bytes(cache["bytes_after"])]]


def compile_line(data: dict[str, Any]) -> str:
    """How the rewritten model was compiled, and every call that fell back to eager."""
    comp = data.get("compile")
    if comp is None:
        return "compile: not compiled (compile=False: rewritten graphs run eagerly)"
    sizes = ", ".join(str(s) for s in comp.get("graph_sizes", [])) or "-"
    line = (f"compile: {comp['backend']}, {comp['graphs']} graph(s) compiled in {comp['seconds']:.2f} s "
            f"(nodes per graph: {sizes}), {comp['graph_breaks']} graph break(s)"
            + ("; graphs compile lazily on the first calls" if comp["graphs"] == 0 else ""))
    if comp.get("onednn_linears"):
        line += f"; {comp['onednn_linears']} linear layer(s) on oneDNN (measured faster than MKL on this CPU)"
    fallbacks = comp.get("eager_fallbacks") or []
    if fallbacks:
        line += (f"; FELL BACK TO EAGER on {len(fallbacks)} call(s), those calls ran uncompiled: "
                 + "; ".join(dict.fromkeys(fallbacks)))
    return line


def parallel_line(data: dict[str, Any]) -> str | None:
    """The tensor-parallel split (None on one rank)."""
    parallel = data.get("tensor_parallel") or {}
    if parallel.get("tp", 1) <= 1:
        return None
    return (f"tensor parallel: {parallel['tp']} ranks (this is rank {parallel['rank']}); "
            + ", ".join(f"{k}: {v}" for k, v in sorted(parallel["sharding"].items())))


def skipped_line(data: dict[str, Any]) -> str:
    skipped = data.get("skipped") or []
    return "skipped: " + ("; ".join(f"{s['module']} ({s['reason']})" for s in skipped) if skipped else "nothing")


def closing_lines(data: dict[str, Any]) -> list[str]:
    """The lines after the tables: compile, tensor parallelism (when used), skipped blocks."""
    return [line for line in (compile_line(data), parallel_line(data), skipped_line(data)) if line is not None]
