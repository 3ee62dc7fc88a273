"""Cost-model validation (issue 4): the plan's choice and predicted time against measured decode steps.

Over a grid (context x batch x s_q x two model shapes) both rewritten paths are compiled (Inductor, one
model per path and shape, reused across the grid) and timed (``common.DecodeTimer``); the plan for the
measured ``cpu`` target (``targets.measure_cpu()``, measured in this process with the same thread count)
is asked for the same point. Reported:

- right choices: the fraction of points where the plan's path is the measured-faster one, or within 5 % of it;
- predicted/measured time: the plan predicts attention only, so it is compared (a) as it is, and (b) with
  a calibration applied by this benchmark (not by the plan): the rest of the model (MLP, norms, lm_head;
  not the embedding lookup) costed on the same roofline from its parameter count. Both are reported.

The models are the benchmark shapes cut to 2 layers (the plan scales linearly in layers; fewer layers keep
the grid's compiles and caches affordable on 2 cores).

    python -m benchmarks.cost_model [--quick] [--no-compile] [--out benchmarks/results]
"""

from __future__ import annotations

import itertools
import statistics
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
    """Roofline time of everything outside attention for one step: MLPs, norms and lm_head read their
    weights once and spend 2 FLOPs per weight and token (the embedding is a lookup, not a read)."""
    attention = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    embedding = model.get_input_embeddings().weight.numel()
    rest = common.parameter_count(model) - attention - embedding
    element = torch.empty((), dtype=dtype).element_size()
    name = str(dtype).removeprefix("torch.")
    return max(rest * element / target.memory_bandwidth, 2 * rest * tokens / target.peak(name))


def core_efficiency(config, target, path: str, *, compile: bool, dtype: torch.dtype, context: int = 2048,
                    device: str = "cpu") -> dict[str, float]:
    """How far this machine's attention kernel is from the roofline, measured once per shape and path.

    Times the runtime's own attention call (``runtime.causal_attention`` on the views of the cache layout the
    plan takes, with the
    boolean mask a StaticCache step passes; Inductor-compiled when the grid is) for one sequence, one new
    token, ``context`` cached tokens, and divides by the plan's attention-core time for that point. The
    factor then scales the plan's attention core at every grid point (the other parts keep the roofline).
    """
    from gqla_compile.cost_model import plan
    from gqla_compile.dims import LatentDims
    from gqla_compile.paths import PATHS
    from gqla_compile.runtime import LatentAttentionCore, causal_attention

    d = LatentDims.from_config(config)
    name = str(dtype).removeprefix("torch.")
    chosen = plan(config, target, s_q=1, batch_size=1, context_len=context, dtype=name, path=path)
    generator = torch.Generator().manual_seed(0)
    s = context + 1
    key_shape, value_shape = PATHS[path].cache_shapes(d, 1, s, rope_key=chosen.rope_key)
    q = torch.randn(1, d.n_h, 1, PATHS[path].query_head_dims(d), generator=generator).to(device, dtype)
    k = torch.randn(key_shape, generator=generator).to(device, dtype)
    v = torch.randn(value_shape, generator=generator).to(device, dtype)
    mask = torch.ones(1, 1, 1, s, dtype=torch.bool, device=device)
    # only the core's cache reading is used (views of the layout the plan took), not its output projection
    reader = LatentAttentionCore(torch.empty(0), None, 0.1, latent_value_dims=d.d_c if path == "absorbed" else None,
                                 shared_rope_key=(d.n_g, d.d_R) if chosen.rope_key == "shared" and path == "grouped"
                                 else None)

    def core(q, k, v, mask):
        keys, value = reader.cache_views(k, v)
        return causal_attention(q, keys, value, mask, 0.1)

    fn = torch.compile(core, dynamic=False) if compile else core
    timing = common.time_call(lambda: fn(q, k, v, mask), warmup=2, min_repeats=5, budget_s=0.5)
    predicted = chosen.costs[path].part("attention_core").time_s
    return {"context": context, "measured_s": timing.median, "predicted_s": predicted,
            "factor": timing.median / predicted}


def calibrated_step(cost, factor: float, rest: float) -> float:
    """The plan's step with its attention core scaled by the measured factor, plus the rest of the model."""
    per_layer = sum(p.time_s * (factor if p.name == "attention_core" else 1.0) for p in cost.parts)
    return cost.num_layers * per_layer + rest


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
    points, factors = [], {}
    for shape in pool.shapes or cfg["shapes"]:
        config = pool.config(shape)
        base = pool.get(shape, "original")
        factors[shape] = {path: core_efficiency(config, target, path, compile=compile, dtype=pool.dtype,
                                                context=cfg["contexts"][-1], device=pool.device)
                          for path in common.PATHS}
        for s_q, batch, context in itertools.product(cfg["s_qs"], cfg["batches"], cfg["contexts"]):
            p = plan(config, target, s_q=s_q, batch_size=batch, context_len=context, dtype=dtype_name)
            rest = rest_of_model_seconds(base, target, tokens=batch * s_q, dtype=pool.dtype)
            point = {"shape": shape, "s_q": s_q, "batch": batch, "context": context, "plan_path": p.path,
                     "rest_of_model_predicted_s": rest, "paths": {}}
            for path in common.PATHS:
                result = runs.decode(shape, path, compile, batch=batch, context=context, s_q=s_q)
                timing = result["timing"]
                predicted = p.costs[path].step_time_s
                point["paths"][path] = {
                    "measured_s": timing.median if timing else None,
                    "timing": timing.to_dict() if timing else None,
                    "predicted_attention_s": predicted,
                    "predicted_plus_rest_s": predicted + rest,
                    "predicted_calibrated_s": calibrated_step(p.costs[path], factors[shape][path]["factor"], rest),
                    "predicted_bound": p.costs[path].bound,
                    "skipped": result["skipped"],
                }
            points.append(_judge(point))
    payload = {
        "part": PART, "quick": quick, "settings": cfg, "compiled": compile, "dtype": str(pool.dtype),
        "layers": pool.config((pool.shapes or cfg["shapes"])[0]).num_hidden_layers, "tolerance": TOLERANCE, "machine": machine,
        "load_average_after": common.load_average(),
        "target": {"name": target.name, "peak_flops": dict(target.peak_flops),
                   "memory_bandwidth": target.memory_bandwidth},
        "core_efficiency": factors, "points": points, "accuracy": accuracy(points),
    }
    common.write_json(out, PART, payload)
    return payload


def _judge(point: dict[str, Any]) -> dict[str, Any]:
    measured = {p: v["measured_s"] for p, v in point["paths"].items()}
    if None in measured.values():
        point.update(measured_faster=None, right=None)
        return point
    faster = min(measured, key=measured.get)
    point["measured_faster"] = faster
    point["measured_ratio_other_over_faster"] = max(measured.values()) / min(measured.values())
    point["right"] = measured[point["plan_path"]] <= (1 + TOLERANCE) * measured[faster]
    calibrated = {p: v["predicted_calibrated_s"] for p, v in point["paths"].items()}
    point["calibrated_path"] = min(calibrated, key=calibrated.get)
    point["calibrated_right"] = measured[point["calibrated_path"]] <= (1 + TOLERANCE) * measured[faster]
    return point


def accuracy(points: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [p for p in points if p["right"] is not None]
    ratios = [v["predicted_attention_s"] / v["measured_s"] for p in judged for v in p["paths"].values()]
    plus_rest = [v["predicted_plus_rest_s"] / v["measured_s"] for p in judged for v in p["paths"].values()]
    calibrated = [v["predicted_calibrated_s"] / v["measured_s"] for p in judged for v in p["paths"].values()]
    strict = [p for p in judged if p["plan_path"] == p["measured_faster"]]
    return {
        "points": len(judged),
        "right_choices": sum(p["right"] for p in judged),
        "right_fraction": sum(p["right"] for p in judged) / len(judged) if judged else None,
        "strictly_right_fraction": len(strict) / len(judged) if judged else None,
        "median_predicted_over_measured": statistics.median(ratios) if ratios else None,
        "median_plus_rest_predicted_over_measured": statistics.median(plus_rest) if plus_rest else None,
        "median_calibrated_predicted_over_measured": statistics.median(calibrated) if calibrated else None,
        "calibrated_right_fraction": sum(p["calibrated_right"] for p in judged) / len(judged) if judged else None,
        "calibrated_ratio_range": [min(calibrated), max(calibrated)] if calibrated else None,
        "wrong": [{k: p[k] for k in ("shape", "s_q", "batch", "context", "plan_path", "measured_faster",
                                     "measured_ratio_other_over_faster", "calibrated_path")}
                  for p in judged if not p["right"]],
    }


def summary(payload: dict[str, Any]) -> str:
    acc = payload["accuracy"]
    t = payload["target"]
    lines = [
        "## Cost-model validation (issue 4)", "",
        f"Target `cpu` measured in this run: float32 {t['peak_flops']['float32'] / 1e9:.0f} GFLOP/s, copy bandwidth "
        f"{t['memory_bandwidth'] / 1e9:.1f} GB/s. Models: {payload['layers']} layers, "
        f"{'compiled' if payload['compiled'] else 'eager'} paths, {payload['dtype']}.", "",
        f"- right choices (plan's path measured fastest or within {payload['tolerance']:.0%}): "
        f"**{acc['right_choices']}/{acc['points']} = {_pct(acc['right_fraction'])}** "
        f"(strictly fastest: {_pct(acc['strictly_right_fraction'])})",
        f"- median predicted/measured step time: attention only, as planned: {_num(acc['median_predicted_over_measured'])}; "
        f"plus the rest of the model on the same roofline: {_num(acc['median_plus_rest_predicted_over_measured'])}; "
        f"calibrated (attention core scaled by the kernel efficiency measured once per shape and path, plus the "
        f"rest): {_num(acc['median_calibrated_predicted_over_measured'])} (range {_range(acc['calibrated_ratio_range'])})",
        f"- right choices with the calibrated prediction: **{_pct(acc['calibrated_right_fraction'])}**", "",
        "Attention-core efficiency (measured kernel time / roofline time, one sequence, one token):", "",
        common.markdown_table(["shape", "path", "context", "measured us", "roofline us", "factor"],
                              [[sh, p, f["context"], f["measured_s"] * 1e6, f["predicted_s"] * 1e6, f["factor"]]
                               for sh, fs in payload["core_efficiency"].items() for p, f in fs.items()]), "",
    ]
    rows = []
    for p in payload["points"]:
        a, g = p["paths"]["absorbed"], p["paths"]["grouped"]
        rows.append([p["shape"], p["s_q"], p["batch"], p["context"], p["plan_path"], p["measured_faster"] or "-",
                     common.ms(a["measured_s"]), common.ms(g["measured_s"]), common.ms(a["predicted_calibrated_s"]),
                     common.ms(g["predicted_calibrated_s"]), {True: "yes", False: "**no**", None: "-"}[p["right"]],
                     p.get("calibrated_path") or "-"])
    lines += [common.markdown_table(["shape", "s_q", "batch", "context", "plan", "measured faster", "absorbed ms",
                                     "grouped ms", "calibr. absorbed ms", "calibr. grouped ms", "plan right",
                                     "calibrated choice"], rows), ""]
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
