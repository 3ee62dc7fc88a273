"""Decode step time versus s_q (issue 6): 1, 2, 4, 8 new tokens per sequence and step on a filled cache,
for both rewritten paths and the unmodified model, over contexts: where does the grouped path (few FLOPs
per cached byte) overtake the absorbed path (few bytes, many FLOPs) on this machine?

Same models as the cost-model grid (2 layers, shared in one suite run so their compiles and common points
are reused); per-token time = step time / (batch * s_q).

    python -m benchmarks.sq [--quick] [--no-compile] [--out benchmarks/results]
"""

from __future__ import annotations

from typing import Any

from . import common
from .cost_model import grid_pool

PART = "sq"


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"shapes": ["gqla"], "contexts": [32, 64], "s_qs": [1, 2, 4], "batch": 1, "budget_s": 0.02}
    return {"shapes": list(common.SHAPES), "contexts": [512, 2048, 8192], "s_qs": [1, 2, 4, 8], "batch": 1,
            "budget_s": 0.3}


def run(out: str, *, quick: bool = False, compile: bool = True, pool: common.ModelPool | None = None,
        measurements: common.Measurements | None = None) -> dict[str, Any]:
    cfg = settings(quick)
    pool = pool or grid_pool(quick)
    runs = measurements or common.Measurements(pool, budget_s=cfg["budget_s"])
    machine = common.machine_info(pool.device)
    variants = [("original", False), ("absorbed", compile), ("grouped", compile)]
    rows, crossovers = [], {}
    for shape in pool.shapes or cfg["shapes"]:
        for context in cfg["contexts"]:
            by_sq = {}
            for s_q in cfg["s_qs"]:
                row = {"shape": shape, "context": context, "s_q": s_q, "batch": cfg["batch"]}
                for variant, compiled in variants:
                    result = runs.decode(shape, variant, compiled, batch=cfg["batch"], context=context, s_q=s_q)
                    timing = result["timing"]
                    row[variant] = {"compiled": compiled, "step_s": timing.median if timing else None,
                                    "timing": timing.to_dict() if timing else None}
                a, g = row["absorbed"]["step_s"], row["grouped"]["step_s"]
                row["grouped_over_absorbed"] = common.ratio(g, a) if a and g else None
                rows.append(row)
                by_sq[s_q] = row["grouped_over_absorbed"]
            faster = [s for s, r in by_sq.items() if r is not None and r < 1.0]
            crossovers[f"{shape}@{context}"] = min(faster) if faster else None
    payload = {"part": PART, "quick": quick, "settings": cfg, "compiled": compile, "dtype": str(pool.dtype),
               "machine": machine, "load_average_after": common.load_average(), "rows": rows,
               "crossover_s_q": crossovers}
    common.write_json(out, PART, payload)
    return payload


def summary(payload: dict[str, Any]) -> str:
    kind = "compiled" if payload["compiled"] else "eager"
    lines = ["## Step time versus s_q (issue 6)", "",
             f"Batch {payload['settings']['batch']}, rewritten paths {kind}, unmodified model eager. "
             "Crossover = the smallest s_q at which the grouped path's step is faster than the absorbed path's "
             "(none: absorbed stays faster).", ""]
    rows = [[r["shape"], r["context"], r["s_q"], common.ms(r["original"]["step_s"]), common.ms(r["absorbed"]["step_s"]),
             common.ms(r["grouped"]["step_s"]), r["grouped_over_absorbed"]] for r in payload["rows"]]
    lines += [common.markdown_table(["shape", "context", "s_q", "unmodified ms", "absorbed ms", "grouped ms",
                                     "grouped / absorbed"], rows), ""]
    lines += [common.markdown_table(["shape@context", "crossover s_q"],
                                    [[k, v if v is not None else "none"] for k, v in payload["crossover_s_q"].items()]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.part_main("benchmarks.sq", __doc__, run, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
