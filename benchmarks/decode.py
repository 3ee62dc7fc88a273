"""Decode speed and cache size (issue 3), plus compile time (issue 6 item 5).

Steady-state decode steps (one new token per sequence on a cache of ``context`` tokens, see
``common.DecodeTimer``) of a ~100M-parameter random-weight model: the unmodified transformers model (eager;
it re-expands the whole cached latent at every step) against each rewritten path, eager and compiled.
Tokens/s = batch / median step time; speed-ups are ratios to the unmodified model in the same run.

    python -m benchmarks.decode [--quick] [--no-compile] [--out benchmarks/results]
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import common

PART = "decode"


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"shapes": ["gqla"], "contexts": [64, 128], "batches": [1, 2], "budget_s": 0.02}
    # compiled variants at the contexts the aims name (every new shape may cost an Inductor recompile of
    # about a minute on this machine); eager variants at all three
    return {"shapes": ["gqla"], "contexts": [512, 2048, 8192], "compiled_contexts": [2048, 8192], "batches": [1, 8],
            "budget_s": 1.5}


def cache_sizes(pool: common.ModelPool, shape: str) -> dict[str, Any]:
    """Cache bytes per token (all layers) from dims.kv_cache_elements, checked against the measured layout."""
    from gqla_compile.dims import kv_cache_elements

    config = pool.config(shape)
    element = torch.empty((), dtype=pool.dtype).element_size()
    layers = config.num_hidden_layers
    sizes = {}
    for variant in common.VARIANTS:
        predicted = kv_cache_elements(config, variant) * element * layers
        layout = common.cache_layout(pool.get(shape, variant), pool.device)
        sizes[variant] = {"bytes_per_token": predicted, "measured_bytes_per_token": common.cache_bytes(
            layout, 1, 1, pool.dtype), "layout_per_layer": {"key": list(layout[0][0]), "value": list(layout[0][1])}}
    return sizes


def run(out: str, *, quick: bool = False, compile: bool = True, pool: common.ModelPool | None = None,
        measurements: common.Measurements | None = None) -> dict[str, Any]:
    cfg = settings(quick)
    pool = pool or common.ModelPool(quick=quick)
    runs = measurements or common.Measurements(pool, budget_s=cfg["budget_s"], max_cache_bytes=6e9)
    machine_before = common.machine_info(pool.device)
    variants = [("original", False), ("absorbed", False), ("grouped", False)]
    if compile:
        variants += [("absorbed", True), ("grouped", True)]
    shapes = {}
    for shape in pool.shapes or cfg["shapes"]:
        base = pool.get(shape, "original")
        compile_info = {}
        rows = []
        for variant, compiled in variants:
            if compiled:
                start = time.perf_counter()
                model = pool.get(shape, variant, True)
                compile_info[variant] = {"optimize_s": time.perf_counter() - start}
            for batch in cfg["batches"]:
                for context in cfg.get("compiled_contexts", cfg["contexts"]) if compiled else cfg["contexts"]:
                    result = runs.decode(shape, variant, compiled, batch=batch, context=context)
                    rows.append({"variant": variant, "compiled": compiled, "batch": batch, "context": context,
                                 **_figures(result, batch)})
            if compiled:
                stats = model.gqla_optimization.compile
                first = next(r for r in rows if r["variant"] == variant and r["compiled"])
                compile_info[variant].update({"first_call_s": first["first_call_s"], **(stats.to_dict() if stats else {})})
        for row in rows:  # ratios to the unmodified model at the same point, same run
            ref = next(r for r in rows if r["variant"] == "original" and r["batch"] == row["batch"]
                       and r["context"] == row["context"])
            row["speedup_vs_unmodified"] = (common.ratio(ref["step_s"], row["step_s"])
                                            if row["step_s"] and ref["step_s"] else None)
        shapes[shape] = {
            "config": {k: getattr(pool.config(shape), k, None) for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "kv_lora_rank",
                "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "intermediate_size", "vocab_size")},
            "model_type": pool.config(shape).model_type,
            "parameters": common.parameter_count(base),
            "cache": cache_sizes(pool, shape),
            "compile": compile_info,
            "plan_path": pool.get(shape, "absorbed", False).gqla_optimization.plan.path,
            "rows": rows,
        }
    payload = {
        "part": PART, "quick": quick, "settings": cfg, "dtype": str(pool.dtype),
        "cache_class": "StaticCache (context + 1 slots, filled with random entries; write position reset per step)",
        "machine": machine_before, "load_average_after": common.load_average(),
        "shapes": shapes, "aims": aims(shapes),
    }
    common.write_json(out, PART, payload)
    return payload


def _figures(result: dict[str, Any], batch: int) -> dict[str, Any]:
    timing = result["timing"]
    return {
        "step_s": timing.median if timing else None,
        "timing": timing.to_dict() if timing else None,
        "tokens_per_s": batch / timing.median if timing else None,
        "cache_bytes": result["cache_bytes"],
        "first_call_s": result["first_call_s"],
        "skipped": result["skipped"],
    }


def aims(shapes: dict[str, Any]) -> dict[str, Any]:
    """Issue 3's aims, checked: compiled chosen path >= 3x the unmodified model at the second context
    (2048 in the full run), more at the largest; absorbed cache no larger than transformers'."""
    checks = {}
    for shape, data in shapes.items():
        chosen = data["plan_path"]
        rows = data["rows"]
        contexts = sorted({r["context"] for r in rows})
        compiled = [r for r in rows if r["variant"] == chosen and r["compiled"]]
        speedups = {f"batch{r['batch']}_context{r['context']}": r["speedup_vs_unmodified"] for r in compiled}
        mid = contexts[1] if len(contexts) > 1 else contexts[0]
        at_mid = [r["speedup_vs_unmodified"] for r in compiled if r["context"] == mid and r["speedup_vs_unmodified"]]
        cache = data["cache"]
        checks[shape] = {
            "chosen_path": chosen,
            "compiled_chosen_speedups": speedups,
            f"speedup_ge_3x_at_{mid}": bool(at_mid) and min(at_mid) >= 3.0,
            "absorbed_cache_le_transformers": cache["absorbed"]["bytes_per_token"]
            <= cache["original"]["bytes_per_token"],
            "grouped_cache_matches_design": cache["grouped"]["bytes_per_token"]
            == cache["grouped"]["measured_bytes_per_token"],
        }
    return checks


def summary(payload: dict[str, Any]) -> str:
    lines = ["## Decode speed (issue 3)", ""]
    for shape, data in payload["shapes"].items():
        lines += [f"Model `{shape}` ({data['model_type']}, {data['parameters'] / 1e6:.1f}M parameters, "
                  f"{payload['dtype']}); the plan for `cpu` picks **{data['plan_path']}**.", ""]
        rows = [[common.variant_label(r["variant"], r["compiled"]), r["batch"], r["context"],
                 common.ms(r["step_s"]), _spread(r), r["tokens_per_s"], r["speedup_vs_unmodified"],
                 r["cache_bytes"] / 2**20, r["skipped"] or ""] for r in data["rows"]]
        lines += [common.markdown_table(["variant", "batch", "context", "step ms (median)", "min-max ms", "tokens/s",
                                         "x unmodified", "cache MiB", "note"], rows), ""]
        cache_rows = [[v, c["bytes_per_token"], c["measured_bytes_per_token"],
                       f"key {c['layout_per_layer']['key']}, value {c['layout_per_layer']['value']}"]
                      for v, c in data["cache"].items()]
        lines += ["Cache bytes per token (all layers):", "",
                  common.markdown_table(["path", "predicted (dims)", "measured (cache layout)", "per layer [heads, dim]"],
                                        cache_rows), ""]
        if data["compile"]:
            comp_rows = [[p, c["optimize_s"], c["first_call_s"], c["graphs"], c["seconds"], c["graph_breaks"]]
                         for p, c in data["compile"].items()]
            lines += ["Compile time: `optimize(..., compile=True)` (capture, rewrite, verify) and the first decode "
                      "call (dynamo + Inductor), then all graphs compiled over the whole run:", "",
                      common.markdown_table(["path", "optimize s", "first call s", "graphs", "Inductor s total",
                                             "graph breaks"], comp_rows), ""]
        lines += [f"Aims: `{payload['aims'][shape]}`", ""]
    return "\n".join(lines)


def _spread(row: dict[str, Any]) -> str:
    t = row["timing"]
    return f"{t['min'] * 1e3:.3g}-{t['max'] * 1e3:.3g}" if t else "-"


def main(argv=None) -> int:
    return common.part_main("benchmarks.decode", __doc__, run, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
