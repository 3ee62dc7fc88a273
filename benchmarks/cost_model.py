"""Cost-model validation (issues 4 and 14): the plan's choice and predicted step time against measured decode steps.

Over a grid (context x batch x s_q x two model shapes) both rewritten paths are compiled (Inductor, one
model per path and shape, reused across the grid) and timed (``common.DecodeTimer``); the plan for the
measured ``cpu`` target (``targets.measure_cpu()``: read bandwidth, matmul rate and the measured efficiency
of the GEMVs and of each path's attention core, at this process's thread count, cached under
~/.cache/gqla_compile) is asked for the same point. Reported:

- right choices: the fraction of points where the plan's path is the measured-faster one, or within 5 % of it;
- predicted/measured step time: the plan predicts the attention layers; the rest of the model (MLP, norms,
  lm_head; not the embedding lookup) is costed by this benchmark on the same target from its parameter count
  (weights read once, at the target's measured GEMV efficiency) and added. The plan alone is reported too.

The models are the benchmark shapes cut to 2 layers (the plan scales linearly in layers; fewer layers keep
the grid's compiles and caches affordable on 2 cores).

    python -m benchmarks.cost_model [--quick] [--no-compile] [--out benchmarks/results]
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

import torch

from . import common

PART = "cost_model"
TOLERANCE = 0.05
GRID_LAYERS = 2


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"shapes": list(common.SHAPES), "contexts": [32], "batches": [1, 2], "s_qs": [1, 2],
                "budget_s": 0.02}
    return {"shapes": list(common.SHAPES), "contexts": [512, 2048, 8192], "batches": [1, 8], "s_qs": [1, 2, 4],
            "budget_s": 0.3}


def grid_pool(quick: bool) -> common.ModelPool:
    """The models of the grid (shared with the sq part): the benchmark shapes with 2 layers."""
    return common.ModelPool(quick=quick, config_overrides={"num_hidden_layers": GRID_LAYERS})


def rest_of_model_seconds(model, target, *, tokens: int, dtype: torch.dtype) -> float:
    """Time of everything outside attention for one step on the target: MLPs, norms and lm_head read their
    weights once and spend 2 FLOPs per weight and token (the embedding is a lookup, not a read), at the
    target's GEMV efficiency."""
    from gqla_compile.targets import KERNEL_GEMV

    attention = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    embedding = model.get_input_embeddings().weight.numel()
    rest = common.parameter_count(model) - attention - embedding
    element = torch.empty((), dtype=dtype).element_size()
    name = str(dtype).removeprefix("torch.")
    roofline = max(rest * element / target.memory_bandwidth, 2 * rest * tokens / target.peak(name))
    return roofline / target.efficiency(KERNEL_GEMV, tokens)


def run(out: str, *, quick: bool = False, compile: bool = True, pool: common.ModelPool | None = None,
        measurements: common.Measurements | None = None) -> dict[str, Any]:
    from gqla_compile import targets
    from gqla_compile.cost_model import plan

    cfg = settings(quick)
    pool = pool or grid_pool(quick)
    runs = measurements or common.Measurements(pool, budget_s=cfg["budget_s"])
    machine = common.machine_info(pool.device)
    target = targets.measure_cpu()
    dtype_name = str(pool.dtype).removeprefix("torch.")
    points = []
    for shape in pool.shapes or cfg["shapes"]:
        config = pool.config(shape)
        base = pool.get(shape, "original")
        for s_q, batch, context in itertools.product(cfg["s_qs"], cfg["batches"], cfg["contexts"]):
            p = plan(config, target, s_q=s_q, batch_size=batch, context_len=context, dtype=dtype_name)
            rest = rest_of_model_seconds(base, target, tokens=batch * s_q, dtype=pool.dtype)
            point = {"shape": shape, "s_q": s_q, "batch": batch, "context": context, "plan_path": p.path,
                     "rope_key": p.rope_key, "rest_of_model_predicted_s": rest, "paths": {}}
            for path in common.PATHS:
                result = runs.decode(shape, path, compile, batch=batch, context=context, s_q=s_q)
                timing = result["timing"]
                predicted = p.costs[path].step_time_s
                point["paths"][path] = {
                    "measured_s": timing.median if timing else None,
                    "timing": timing.to_dict() if timing else None,
                    "predicted_attention_s": predicted,
                    "predicted_step_s": predicted + rest,
                    "predicted_bound": p.costs[path].bound,
                    "attention_core_efficiency": p.costs[path].part("attention_core").efficiency,
                    "skipped": result["skipped"],
                }
            points.append(_judge(point))
            common.write_json(out, PART, _payload(quick, cfg, compile, pool, machine, target, points, complete=False))
    payload = _payload(quick, cfg, compile, pool, machine, target, points, complete=True)
    common.write_json(out, PART, payload)
    (Path(out) / f"{PART}.md").write_text(summary(payload) + "\n")
    return payload


def _payload(quick, cfg, compile, pool, machine, target, points, *, complete: bool) -> dict[str, Any]:
    return {
        "part": PART, "quick": quick, "settings": cfg, "compiled": compile, "complete": complete,
        "dtype": str(pool.dtype), "layers": GRID_LAYERS, "tolerance": TOLERANCE, "machine": machine,
        "load_average_after": common.load_average(),
        "target": {"name": target.name, "peak_flops": dict(target.peak_flops),
                   "memory_bandwidth": target.memory_bandwidth,
                   "kernels": {k: {"rows": list(v.rows), "efficiency": list(v.efficiency)}
                               for k, v in target.kernels.items()}},
        "points": points, "accuracy": accuracy(points),
    }


def _judge(point: dict[str, Any]) -> dict[str, Any]:
    measured = {p: v["measured_s"] for p, v in point["paths"].items()}
    if None in measured.values():
        point.update(measured_faster=None, right=None)
        return point
    faster = min(measured, key=measured.get)
    point["measured_faster"] = faster
    point["measured_ratio_other_over_faster"] = max(measured.values()) / min(measured.values())
    point["right"] = measured[point["plan_path"]] <= (1 + TOLERANCE) * measured[faster]
    return point


def accuracy(points: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [p for p in points if p["right"] is not None]
    attention = [v["predicted_attention_s"] / v["measured_s"] for p in judged for v in p["paths"].values()]
    step = [v["predicted_step_s"] / v["measured_s"] for p in judged for v in p["paths"].values()]
    strict = [p for p in judged if p["plan_path"] == p["measured_faster"]]
    return {
        "points": len(judged),
        "right_choices": sum(p["right"] for p in judged),
        "right_fraction": sum(p["right"] for p in judged) / len(judged) if judged else None,
        "strictly_right_fraction": len(strict) / len(judged) if judged else None,
        "median_attention_predicted_over_measured": statistics.median(attention) if attention else None,
        "median_step_predicted_over_measured": statistics.median(step) if step else None,
        "step_ratio_range": [min(step), max(step)] if step else None,
        "step_ratio_within_1.5x_fraction": (sum(1 / 1.5 <= r <= 1.5 for r in step) / len(step)) if step else None,
        "wrong": [{k: p[k] for k in ("shape", "s_q", "batch", "context", "plan_path", "measured_faster",
                                     "measured_ratio_other_over_faster")}
                  for p in judged if not p["right"]],
    }


def summary(payload: dict[str, Any]) -> str:
    acc = payload["accuracy"]
    t = payload["target"]
    kernels = "; ".join(f"{k} " + ", ".join(f"{r}: {e:.2f}" for r, e in zip(v["rows"], v["efficiency"]))
                        for k, v in t["kernels"].items())
    lines = [
        "## Cost-model validation (issues 4 and 14)", "",
        f"Target `cpu` measured by `targets.measure_cpu()`: float32 {t['peak_flops']['float32'] / 1e9:.0f} GFLOP/s, read "
        f"bandwidth {t['memory_bandwidth'] / 1e9:.1f} GB/s; kernel efficiency (fraction of the roofline, by rows): "
        f"{kernels}. Models: {payload['layers']} layers, {'compiled' if payload['compiled'] else 'eager'} paths, "
        f"{payload['dtype']}.", "",
    ]
    if not payload.get("complete", True):
        lines += ["**The run did not finish: only the points listed were measured.**", ""]
    lines += [
        f"- right choices (plan's path measured fastest or within {payload['tolerance']:.0%}): "
        f"**{acc['right_choices']}/{acc['points']} = {_pct(acc['right_fraction'])}** "
        f"(strictly fastest: {_pct(acc['strictly_right_fraction'])})",
        f"- median predicted/measured step time: **{_num(acc['median_step_predicted_over_measured'])}** (plan's "
        f"attention plus the rest of the model on the same target; range {_range(acc['step_ratio_range'])}, "
        f"within 1.5x at {_pct(acc['step_ratio_within_1.5x_fraction'])} of the path-points); the plan's "
        f"attention alone: {_num(acc['median_attention_predicted_over_measured'])}", "",
    ]
    rows = []
    for p in payload["points"]:
        a, g = p["paths"]["absorbed"], p["paths"]["grouped"]
        rows.append([p["shape"], p["s_q"], p["batch"], p["context"], p["plan_path"], p["measured_faster"] or "-",
                     common.ms(a["measured_s"]), common.ms(g["measured_s"]), common.ms(a["predicted_step_s"]),
                     common.ms(g["predicted_step_s"]), {True: "yes", False: "**no**", None: "-"}[p["right"]]])
    lines += [common.markdown_table(["shape", "s_q", "batch", "context", "plan", "measured faster", "absorbed ms",
                                     "grouped ms", "predicted absorbed ms", "predicted grouped ms", "plan right"],
                                    rows), ""]
    return "\n".join(lines)


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f} %"


def _num(x):
    return "-" if x is None else f"{x:.2f}"


def _range(r):
    return "-" if not r else f"{r[0]:.2f}-{r[1]:.2f}"


def main(argv=None) -> int:
    return common.part_main("benchmarks.cost_model", __doc__, run, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
