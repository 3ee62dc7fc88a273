"""The report's facts: ``optimize``'s records (pass records, plan, installed runtimes) turned into plain data.

Identical layers (same dims, path and op histograms) are folded into one row with a count.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import warnings
from collections import Counter
from dataclasses import asdict
from typing import Any

from torch import nn

from ..errors import NoLatentAttentionError, NoLatentAttentionWarning, ReportError
from ..paths import CORE_TRACE_CONTEXT, ORIGINAL_CACHE_LAYOUT, PATHS
from ..pipeline import optimize
from ..targets import DTYPE_BYTES
from .document import SCHEMA_VERSION, Report

logger = logging.getLogger(__name__)


def report(model: nn.Module, target: Any = None, **optimize_kwargs: Any) -> Report:
    """The graph-diff report of ``model``.

    On an optimized model (``gqla_compile.optimize`` was run on it) the report reads its records. On a
    model that was not optimized, ``target=`` makes it a dry run: a deep copy is optimized with
    ``compile=False`` (and ``optimize_kwargs``: path, s_q, batch_size, context_len, ...) and reported on;
    the model itself is not changed.
    """
    state = getattr(model, "gqla_optimization", None)
    if state is not None:
        if target is not None:
            logger.info("the model is already optimized; reporting its optimization, not a new one for %s", target)
        return _build(model, state, dry_run=False)
    if target is None:
        raise ReportError(
            f"{type(model).__name__} was not optimized: call gqla_compile.optimize(model, target=...) first, "
            "or pass target= for a dry run (report(model, target='h100') optimizes a copy)"
        )
    return _dry_run(model, target, optimize_kwargs)


def _dry_run(model: nn.Module, target: Any, optimize_kwargs: dict[str, Any]) -> Report:
    """Optimize a deep copy (compile=False unless asked) and report on it; the model is left alone."""
    optimize_kwargs.setdefault("compile", False)
    subject = copy.deepcopy(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NoLatentAttentionWarning)
            optimize(subject, target=target, **optimize_kwargs)
    except NoLatentAttentionError as exc:
        return _no_latent_report(model, str(exc), target)
    for warning in caught:  # optimize's own warning says why nothing matched: the report says it instead
        if not issubclass(warning.category, NoLatentAttentionWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    state = getattr(subject, "gqla_optimization", None)
    if state is None:
        reasons = [str(w.message) for w in caught if issubclass(w.category, NoLatentAttentionWarning)]
        return _no_latent_report(model, reasons[-1] if reasons else None, target)
    return _build(subject, state, dry_run=True)


def _no_latent_report(model: nn.Module, message: str | None, target: Any) -> Report:
    message = message or (
        f"{type(model).__name__} holds no latent attention: nothing was rewritten. "
        "Convert a GQA model with gqla_compile.convert first"
    )
    return _document(model, dry_run=True, latent_attention=False, message=message,
                     target={"name": getattr(target, "name", str(target))}, path=None, layers=[], skipped=[],
                     compile=None)


def _document(model: nn.Module, **facts: Any) -> Report:
    return Report({"schema": SCHEMA_VERSION, "model": type(model).__name__, **facts})


def _build(model: nn.Module, state: Any, *, dry_run: bool) -> Report:
    plan = state.plan
    dtype_bytes = DTYPE_BYTES.get(plan.dtype, 4)
    rows = [_layer_row(layer, dtype_bytes) for layer in state.layers]
    return _document(
        model,
        dry_run=dry_run,
        latent_attention=True,
        message=None,
        path=state.path,
        target={"name": plan.target.name, "dtype": plan.dtype, "peak_flops": plan.peak_flops,
                "memory_bandwidth": plan.target.memory_bandwidth, "ridge": plan.ridge},
        plan=_plan_section(plan),
        layers=_fold_identical(rows),
        rewritten_layers=len(state.layers),
        cache=_whole_model_cache(rows, plan, dtype_bytes),
        compile=state.compile.to_dict() if state.compile is not None else None,
        tensor_parallel={"tp": state.tp, "rank": state.rank, "sharding": dict(state.tp_sharding)},
        skipped=[{"module": m, "reason": r} for m, r in state.skipped],
        seconds=round(float(state.seconds), 3),
    )


def _fold_identical(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of layers with the same dims, path and op histograms (the worst verification error)."""
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
    for group in groups.values():
        group.pop("module"), group.pop("layer_idx")
    return list(groups.values())


def _whole_model_cache(rows: list[dict[str, Any]], plan: Any, dtype_bytes: int) -> dict[str, Any]:
    per_token_before = sum(r["cache"]["bytes_before"] for r in rows)
    per_token_after = sum(r["cache"]["bytes_after"] for r in rows)
    tokens = plan.context_len * plan.batch_size
    return {
        "dtype": plan.dtype,
        "dtype_bytes": dtype_bytes,
        "context_len": plan.context_len,
        "batch_size": plan.batch_size,
        "bytes_per_token_before": per_token_before,  # all rewritten layers together
        "bytes_per_token_after": per_token_after,
        "bytes_before": per_token_before * tokens,
        "bytes_after": per_token_after * tokens,
    }


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
    core = layer.core
    ops_projection = dict(layer.records[-1].ops_after)
    ops_core = dict(core.ops) if core else {}
    match = detect.summary if detect else None  # passes.summaries.MatchSummary: the layer was matched
    error = layer.verification_error
    return {
        "module": layer.module_path,
        "layer_idx": layer.layer_idx,
        "dims": layer.dims.as_dict(),
        "path": layer.path,
        "traced_by": layer.traced_by,
        "attention": match.attention if match else None,
        # the token selection (k, its source), None: dense
        "sparse": asdict(match.sparse) if match and match.sparse is not None else None,
        "verification_error": None if error is None or math.isnan(error) else float(error),
        "projections": dict(match.weights) if match else {},
        "ops_before": dict(detect.ops_before) if detect else {},
        "ops_after": dict(Counter(ops_projection) + Counter(ops_core)),
        "ops_after_projection": ops_projection,
        "ops_after_core": ops_core,
        "matmul_weights_before": [{"graph": "captured", **m} for m in layer.matmul_weights_before],
        "matmul_weights_after": list(layer.matmul_weights_after),
        **_folding(layer.records),
        "removed": dict(records["split"].summary.removed) if "split" in records else {},
        "passes": [{"name": r.pass_name, "uuid": r.uuid, "seconds": round(r.seconds, 4)} for r in layer.records],
        "diff": _graph_diff(layer, detect),
        "compute_forms": dict(layer.compute_forms),
        "cache": _layer_cache(layer, dtype_bytes),
    }


def _folding(records: list[Any]) -> dict[str, Any]:
    """The weights the passes folded, and how the query and output absorptions were done."""
    folded: dict[str, list[int]] = {}
    absorption: dict[str, Any] = {}
    for record in records:
        folded.update({k: list(v) for k, v in record.summary.folded().items()})
        absorption.update(record.summary.absorption())
    return {"folded_weights": folded, "absorption": absorption}


def _graph_diff(layer: Any, detect: Any) -> str:
    """Unified diff of the captured graph's code against the rewritten projection graph and attention core."""
    final = layer.records[-1]
    code_before = detect.code_before if detect else ""
    code_after = final.code_after.strip("\n")
    if layer.core is not None:
        code_after += (f"\n\n# attention core at decode (make_fx, 1 query token, {CORE_TRACE_CONTEXT} cached tokens)\n"
                       + layer.core.code.strip("\n"))
    return "\n".join(difflib.unified_diff(
        code_before.strip("\n").splitlines(), code_after.splitlines(),
        "before: captured attention graph (" + final.module_path + ")",
        "after: projection graph + attention core", lineterm=""))


def _layer_cache(layer: Any, dtype_bytes: int) -> dict[str, Any]:
    """Cache elements and bytes per token of one layer: before, after, and per tensor-parallel rank."""
    before, after = layer.cache_elements_before, layer.cache_elements_after
    per_rank = layer.cache_elements_per_rank if layer.cache_elements_per_rank is not None else after
    return {
        "layout_before": ORIGINAL_CACHE_LAYOUT,
        "layout_after": PATHS[layer.path].cache_layout,
        "elements_before": before,
        "elements_after": after,
        "bytes_before": before * dtype_bytes,
        "bytes_after": after * dtype_bytes,
        "elements_per_rank": per_rank,
        "bytes_per_rank": per_rank * dtype_bytes,
    }
