"""Decode speed and cache size (issue 3), plus compile time (issue 6 item 5).

Steady-state decode steps (one new token per sequence on a cache of ``context`` tokens, see
``common.DecodeTimer``) of a ~100M-parameter random-weight model: the unmodified transformers model (eager;
it re-expands the whole cached latent at every step) against each rewritten path, eager and compiled.
Tokens/s = batch / median step time; speed-ups are ratios to the unmodified model in the same run.

    python -m benchmarks.decode [--quick] [--no-compile] [--out benchmarks/results]
                                [--grid-threads 1,2] [--grid-batches 1,8]

The grid runs thread count by thread count and, within one, batch by batch (every variant and context of
batch 1 before batch 8), so a run cut short keeps whole comparisons. A full run narrowed with
``--grid-threads`` / ``--grid-batches`` keeps the earlier file's rows (and rooflines) of the points it does
not measure, so the grid can be filled in a piece at a time.
"""

from __future__ import annotations

from typing import Any

import torch

from . import common

PART = "decode"


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"shapes": ["gqla"], "contexts": [64, 128], "batches": [1, 2], "threads": [1], "budget_s": 0.02,
                "eager_paths": True}
    # issue 14's grid: both transformers baselines and both compiled paths, batch 1 and 8, context 2k-32k,
    # 1 and 2 threads. The rewritten paths eager are left out of the full run (issue 3 measured them).
    return {"shapes": ["gqla"], "contexts": [2048, 8192, 32768], "batches": [1, 8], "threads": [1, 2],
            "budget_s": 1.0, "eager_paths": False}


def cache_sizes(pool: common.ModelPool, shape: str) -> dict[str, Any]:
    """Cache bytes per token (all layers) from cache_sizes.kv_cache_elements, checked against the measured layout."""
    from gqla_compile.cache_sizes import kv_cache_elements

    config = pool.config(shape)
    element = torch.empty((), dtype=pool.dtype).element_size()
    layers = config.num_hidden_layers
    sizes = {}
    for variant in common.VARIANTS:
        model = pool.get(shape, variant)
        state = getattr(model, "gqla_optimization", None)
        rope_key = state.plan.rope_key if state is not None else "copied"
        predicted = kv_cache_elements(config, variant, rope_key=rope_key) * element * layers
        layout = common.cache_layout(model, pool.device)
        sizes[variant] = {"bytes_per_token": predicted, "measured_bytes_per_token": common.cache_bytes(
            layout, 1, 1, pool.dtype), "layout_per_layer": {"key": list(layout[0][0]), "value": list(layout[0][1])}}
    return sizes


def run(out: str, *, quick: bool = False, compile: bool = True, pool: common.ModelPool | None = None,
        measurements: common.Measurements | None = None, threads: list[int] | None = None,
        batches: list[int] | None = None) -> dict[str, Any]:
    """Every (threads, batch, variant, context) point; the JSON is rewritten after each point, so an
    interrupted run leaves what it measured (``complete`` says whether it finished). ``threads`` and
    ``batches`` narrow the grid."""
    cfg = settings(quick)
    cfg.update({k: v for k, v in (("threads", threads), ("batches", batches)) if v})
    pool = pool or common.ModelPool(quick=quick)
    runs = measurements or common.Measurements(pool, budget_s=cfg["budget_s"], max_cache_bytes=4e9)
    machine_before = common.machine_info(pool.device)
    variants = [("original", False)]
    if cfg["eager_paths"]:
        variants += [("absorbed", False), ("grouped", False)]
    if compile:
        variants += [("original", True), ("absorbed", True), ("grouped", True)]
    threads_before = torch.get_num_threads()
    shapes: dict[str, Any] = {}
    payload = {"part": PART, "quick": quick, "settings": cfg, "dtype": str(pool.dtype), "complete": False,
               "cache_class": "StaticCache (context + 1 slots, filled with random entries; write position reset "
                              "per step): preallocated and written in place, for every variant",
               "machine": machine_before, "shapes": shapes}
    earlier = {} if quick else _earlier_shapes(out)
    try:
        for shape in pool.shapes or cfg["shapes"]:
            base = pool.get(shape, "original")
            kept = earlier.get(shape, {})
            rows: list[dict[str, Any]] = [r for r in kept.get("rows", []) if
                                          (r["threads"], r["batch"]) not in {(t, b) for t in cfg["threads"]
                                                                              for b in cfg["batches"]}]
            rooflines = {int(t): m for t, m in kept.get("rooflines", {}).items() if int(t) not in cfg["threads"]}
            shapes[shape] = {
                "config": {k: getattr(pool.config(shape), k, None) for k in (
                    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "intermediate_size", "vocab_size")},
                "model_type": pool.config(shape).model_type,
                "parameters": common.parameter_count(base),
                "cache": cache_sizes(pool, shape),
                "plan_path": {context: _planned_path(pool, shape, context) for context in cfg["contexts"]},
                "rope_key": pool.get(shape, "grouped", False).gqla_optimization.plan.rope_key,
                "rows": rows, "rooflines": rooflines, "compile": {},
            }
            for threads in cfg["threads"]:
                common.apply_threads(threads)
                machine = _measured_machine(quick)
                rooflines[threads] = machine
                for batch in cfg["batches"]:
                    for variant, compiled in variants:
                        for context in cfg["contexts"]:
                            result = runs.decode(shape, variant, compiled, batch=batch, context=context)
                            row = {"variant": variant, "compiled": compiled, "threads": threads, "batch": batch,
                                   "context": context, "load_average": common.load_average(),
                                   **_figures(result, batch),
                                   **_roofline(pool, shape, variant, batch, context, machine)}
                            rows.append(row)
                            _finish(shape, shapes[shape], pool)
                            payload["load_average_after"] = common.load_average()
                            common.write_json(out, PART, payload)
        payload["complete"] = True
    finally:
        common.apply_threads(threads_before)
    payload["aims"] = aims(shapes)
    payload["load_average_after"] = common.load_average()
    common.write_json(out, PART, payload)
    return payload


def _earlier_shapes(out: str) -> dict[str, Any]:
    """The shapes of the decode results already in ``out`` (a full run's), or nothing."""
    import json
    from pathlib import Path

    path = Path(out) / f"{PART}.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    return {} if earlier.get("quick") else earlier.get("shapes", {})


def _planned_path(pool: common.ModelPool, shape: str, context: int) -> str:
    """The path ``optimize(path="auto")`` would take for one sequence at this context on the pool's target
    (the pool's rewritten models are forced to each path)."""
    from gqla_compile.cost_model import plan

    return plan(pool.config(shape), pool.target, context_len=context, dtype=pool.dtype).path


def _picks(plan_path: dict[str, str] | str) -> str:
    if isinstance(plan_path, str):
        return f"**{plan_path}**"
    return ", ".join(f"**{path}** at context {context}" for context, path in plan_path.items())


def _measured_machine(quick: bool) -> dict[str, float]:
    """Read bandwidth and float32 matmul rate at the current thread count, measured afresh in the run's
    conditions (not read from ``targets.measure_cpu()``'s file)."""
    from gqla_compile import targets

    target = targets.measure_cpu_now()
    return {"bandwidth": target.memory_bandwidth, "peak_float32": target.peak("float32")}


def _roofline(pool: common.ModelPool, shape: str, variant: str, batch: int, context: int,
              machine: dict[str, float]) -> dict[str, Any]:
    """The step's roofline on this machine: every weight read once and the path's attention over the cache
    (cost model terms, all layers), max(bytes / bandwidth, FLOPs / matmul rate). transformers' rows get the
    roofline of the cheaper rewritten path (what the same model can do at best)."""
    from gqla_compile import targets
    from gqla_compile.cost_model import plan

    config = pool.config(shape)
    element = torch.empty((), dtype=pool.dtype).element_size()
    cpu = targets.Target("cpu-measured", {"float32": machine["peak_float32"]},
                         memory_bandwidth=machine["bandwidth"], memory_capacity=1e12,
                         interconnect_bandwidth=machine["bandwidth"], devices_per_node=1)
    p = plan(config, cpu, batch_size=batch, context_len=context, dtype=pool.dtype)
    paths = [variant] if variant in p.costs else list(p.costs)
    best = {}
    parameters = common.parameter_count(pool.get(shape, "original"))
    for path in paths:
        core = p.costs[path].part("attention_core")
        layers = p.num_layers
        n_bytes = parameters * element + core.bytes * layers
        flops = 2 * parameters * batch + core.flops * layers
        step = max(n_bytes / machine["bandwidth"], flops / machine["peak_float32"])
        per_token = max(core.bytes / machine["bandwidth"], core.flops / machine["peak_float32"]) * layers / context
        best[path] = (step, per_token)
    path = min(best, key=lambda k: best[k][0])
    return {"roofline_path": path, "roofline_step_s": best[path][0], "roofline_attention_per_token_s": best[path][1]}


def _finish(shape: str, data: dict[str, Any], pool: common.ModelPool) -> None:
    """Ratios to both transformers baselines at the same point and the attention cost per context token
    (the step's growth between consecutive contexts, per token) against its roofline."""
    rows = data["rows"]

    def at(row, variant, compiled):
        return next((r for r in rows if (r["variant"], r["compiled"]) == (variant, compiled)
                     and all(r[k] == row[k] for k in ("threads", "batch", "context"))), None)

    for row in rows:
        for name, (variant, compiled) in (("vs_transformers_eager", ("original", False)),
                                          ("vs_transformers_compiled", ("original", True))):
            ref = at(row, variant, compiled)
            row[name] = (common.ratio(ref["step_s"], row["step_s"])
                         if ref and ref["step_s"] and row["step_s"] else None)
        row["vs_roofline"] = common.ratio(row["step_s"], row["roofline_step_s"]) if row["step_s"] else None
        smaller = [r for r in rows if (r["variant"], r["compiled"], r["threads"], r["batch"])
                   == (row["variant"], row["compiled"], row["threads"], row["batch"])
                   and r["context"] < row["context"] and r["step_s"]]
        if smaller and row["step_s"]:
            prev = max(smaller, key=lambda r: r["context"])
            per_token = (row["step_s"] - prev["step_s"]) / (row["context"] - prev["context"])
            row["attention_per_token_s"] = per_token
            row["attention_vs_roofline"] = common.ratio(per_token, row["roofline_attention_per_token_s"])
        else:
            row["attention_per_token_s"] = row["attention_vs_roofline"] = None
    for variant in {r["variant"] for r in rows if r["compiled"] and r["variant"] != "original"}:
        stats = pool.get(shape, variant, True).gqla_optimization.compile
        data["compile"][variant] = stats.to_dict() if stats else {}


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
    """Issue 14's aims, checked on what was measured: the compiled paths' attention per context token within
    1.5x of its roofline at the two largest contexts (batch 1, one thread), and every compiled path's step
    faster than both transformers baselines at every measured point."""
    checks = {}
    for shape, data in shapes.items():
        rows = [r for r in data["rows"] if r["compiled"] and r["variant"] != "original" and r["step_s"]]
        contexts = sorted({r["context"] for r in data["rows"]})[-2:]
        attention = {f"{r['variant']}_context{r['context']}": r["attention_vs_roofline"] for r in rows
                     if r["batch"] == 1 and r["threads"] == 1 and r["context"] in contexts}
        slower = [f"{r['variant']} t{r['threads']} b{r['batch']} c{r['context']}" for r in rows
                  if any(x is not None and x <= 1.0 for x in (r["vs_transformers_eager"], r["vs_transformers_compiled"]))]
        checks[shape] = {
            "attention_vs_roofline_batch1_thread1": attention,
            "attention_within_1.5x": bool(attention) and all(v is not None and v <= 1.5 for v in attention.values()),
            "points_not_faster_than_a_baseline": slower,
            "faster_than_both_baselines_everywhere": bool(rows) and not slower,
        }
    return checks


def summary(payload: dict[str, Any]) -> str:
    lines = ["## Decode speed (issues 3 and 14)", ""]
    if not payload.get("complete"):
        lines += ["**The run did not finish: only the points listed were measured.**", ""]
    for shape, data in payload["shapes"].items():
        lines += [f"Model `{shape}` ({data['model_type']}, {data['parameters'] / 1e6:.1f}M parameters, "
                  f"{payload['dtype']}); the plan for `cpu` at batch 1 picks {_picks(data['plan_path'])}, grouped cache with the "
                  f"RoPE key **{data['rope_key']}**. Ratios: the other's step time / this step time, same point, "
                  "same run. Roofline: every weight read once plus the path's attention over the cache, at the "
                  "bandwidth and matmul rate measured at that thread count. Attention per token: the step's growth "
                  "from the next smaller context, per context token.", ""]
        rows = [[common.variant_label(r["variant"], r["compiled"]), r["threads"], r["batch"], r["context"],
                 common.ms(r["step_s"]), _spread(r), r["tokens_per_s"], r.get("vs_transformers_eager"),
                 r.get("vs_transformers_compiled"), common.ms(r["roofline_step_s"]), r.get("vs_roofline"),
                 _ns(r.get("attention_per_token_s")), _ns(r["roofline_attention_per_token_s"]),
                 r.get("attention_vs_roofline"), " ".join(map(str, r["load_average"])), r["skipped"] or ""]
                for r in data["rows"]]
        lines += [common.markdown_table(
            ["variant", "threads", "batch", "context", "step ms", "min-max ms", "tokens/s", "x tf eager",
             "x tf compiled", "roofline ms", "x roofline", "attn ns/token", "roofline ns/token", "attn x roofline",
             "load avg", "note"], rows), ""]
        cache_rows = [[v, c["bytes_per_token"], c["measured_bytes_per_token"],
                       f"key {c['layout_per_layer']['key']}, value {c['layout_per_layer']['value']}"]
                      for v, c in data["cache"].items()]
        lines += ["Cache bytes per token (all layers):", "",
                  common.markdown_table(["path", "predicted (dims)", "measured (cache layout)", "per layer [heads, dim]"],
                                        cache_rows), ""]
        if data["compile"]:
            comp_rows = [[p, c.get("graphs"), c.get("seconds"), c.get("graph_breaks")] for p, c in data["compile"].items()]
            lines += ["Inductor over the whole run:", "",
                      common.markdown_table(["path", "graphs", "Inductor s total", "graph breaks"], comp_rows), ""]
        if "aims" in payload:
            lines += [f"Aims: `{payload['aims'][shape]}`", ""]
    return "\n".join(lines)


def _ns(seconds: float | None) -> float | None:
    return seconds * 1e9 if seconds is not None else None


def _spread(row: dict[str, Any]) -> str:
    t = row["timing"]
    return f"{t['min'] * 1e3:.3g}-{t['max'] * 1e3:.3g}" if t else "-"


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--grid-threads", type=_ints, default=None, help="thread counts of the grid (default 1,2)")
    parser.add_argument("--grid-batches", type=_ints, default=None, help="batch sizes of the grid (default 1,8)")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    payload = run(args.out, quick=args.quick, compile=not args.no_compile, threads=args.grid_threads,
                  batches=args.grid_batches)
    text = summary(payload)
    (Path(args.out) / f"{PART}.md").write_text(text + "\n")
    print(text)
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
