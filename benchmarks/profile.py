"""Where a decode step's time goes (issue 14): torch.profiler per op, per path, per context.

One steady-state decode step (``common.DecodeTimer``: a StaticCache holding ``context`` random tokens, one new
token, batch 1) of the benchmark model on each rewritten path, compiled (what users run; Inductor's fused
C++ kernels are named by ``cpp.enable_kernel_profile``) and eager (every aten op by name). Per op: self CPU
time per step and calls per step. What grows with the context is what reads the cache: the "growth" table
gives each op's extra time per 1,000 context tokens between the smallest and the largest context, and the
cache bytes that growth should cost at the read bandwidth measured in the same run.

    python -m benchmarks.profile [--quick] [--no-compile] [--out benchmarks/results] [--threads 1]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from gqla_compile import targets

from . import common

PART = "profile"
#: Ops that copy or rearrange memory: at decode time on a preallocated cache they should not scale with context.
COPY_OPS = ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "aten::index_copy", "aten::_to_copy",
            "aten::index_put_", "aten::expand_as")
TOP_OPS = 12
#: The attention core's matmuls: MKL's (aten) and oneDNN's (the inner product under kernels.onednn_matmul).
ATTENTION_MATMUL_OPS = ("aten::bmm", "mkldnn::_linear_pointwise")


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"shape": "gqla", "contexts": [64, 256], "steps": 2}
    return {"shape": "gqla", "contexts": [2048, 8192, 32768], "steps": 5}


def profile_step(timer: common.DecodeTimer, steps: int) -> dict[str, Any]:
    """Per-op self CPU time and calls, averaged over ``steps`` profiled decode steps (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        timer.step()
        timer.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            timer.step()
            timer.reset()
    ops = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total <= 0:
            continue
        ops[event.key] = {"self_ms": event.self_cpu_time_total / 1e3 / steps, "calls": event.count / steps}
    timing = timer.time(warmup=0, min_repeats=3, budget_s=0.5)
    return {"step_ms": timing.median * 1e3, "profiled_ms": sum(o["self_ms"] for o in ops.values()),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"]))}


def attention_flops_per_token(config, path: str) -> float:
    """The attention core's FLOPs per cached token and step, all layers (cost-model accounting)."""
    from gqla_compile.cost_model import plan
    from gqla_compile.targets import get

    p = plan(config, get("h100"), context_len=1, dtype="float32", path=path)
    return p.costs[path].part("attention_core").flops * p.num_layers


def growth(small: dict[str, Any], large: dict[str, Any], tokens: int) -> list[dict[str, Any]]:
    """Each op's extra self time per 1,000 context tokens from the small to the large context, largest first."""
    names = set(small["ops"]) | set(large["ops"])
    rows = []
    for name in names:
        extra = large["ops"].get(name, {}).get("self_ms", 0.0) - small["ops"].get(name, {}).get("self_ms", 0.0)
        rows.append({"op": name, "ms_per_1k_tokens": extra / tokens * 1e3,
                     "copy": name.startswith(COPY_OPS)})
    return sorted(rows, key=lambda r: -r["ms_per_1k_tokens"])


def run(out: str, *, quick: bool = False, compile: bool = True, pool: common.ModelPool | None = None
        ) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # name Inductor's fused kernels in the profile
    cfg = settings(quick)
    pool = pool or common.ModelPool(quick=quick)
    shape = cfg["shape"]
    runs = common.Measurements(pool)
    modes = [False, True] if compile else [False]
    payload: dict[str, Any] = {"part": PART, "quick": quick, "settings": cfg, "dtype": str(pool.dtype),
                               "machine": common.machine_info(pool.device), "read_bandwidth": targets.read_bandwidth(),
                               "matmul_rate": targets.matmul_flops(torch.float32),
                               "profiles": [], "growth": {}}
    for path in common.PATHS:
        for compiled in modes:
            model = pool.get(shape, path, compiled)
            layout = runs.layout(shape, path, compiled)
            per_context = {}
            for context in cfg["contexts"]:
                timer = common.DecodeTimer(model, batch=1, context=context, dtype=pool.dtype, device=pool.device,
                                           layout=layout)
                result = profile_step(timer, cfg["steps"])
                timer.close()
                per_context[context] = result
                payload["profiles"].append({"path": path, "compiled": compiled, "context": context,
                                            "cache_bytes": timer.cache_bytes, "load_average": common.load_average(),
                                            **result})
                common.write_json(out, PART, payload)
            small, large = cfg["contexts"][0], cfg["contexts"][-1]
            bytes_per_token = common.cache_bytes(layout, 1, 1, pool.dtype)
            read = bytes_per_token * 1e3 / payload["read_bandwidth"] * 1e3
            compute = attention_flops_per_token(pool.config(shape), path) * 1e3 / payload["matmul_rate"] * 1e3
            payload["growth"][f"{path} {'compiled' if compiled else 'eager'}"] = {
                "step_ms_per_1k_tokens": (per_context[large]["step_ms"] - per_context[small]["step_ms"])
                / (large - small) * 1e3,
                "cache_read_ms_per_1k_tokens": read,
                "flops_ms_per_1k_tokens": compute,
                "roofline_ms_per_1k_tokens": max(read, compute),
                "ops": growth(per_context[small], per_context[large], large - small)[:TOP_OPS],
            }
            common.write_json(out, PART, payload)
    payload["load_average_after"] = common.load_average()
    common.write_json(out, PART, payload)
    (Path(out) / f"{PART}.md").write_text(summary(payload) + "\n")
    return payload


def _attention_matmul_ms(ops: dict[str, Any]) -> float:
    return sum(ops.get(name, {}).get("self_ms", 0.0) for name in ATTENTION_MATMUL_OPS)


def _op(name: str) -> str:
    """An op name short enough for a table: Inductor's kernels lose their graph number, long names are cut."""
    name = re.sub(r"^graph_\d+_", "", name)
    return name if len(name) <= 72 else name[:69] + "..."


def summary(payload: dict[str, Any]) -> str:
    lines = ["## Decode-step profile (issue 14)", "",
             f"torch.profiler, self CPU time per decode step (batch 1, one new token, {payload['dtype']}, "
             f"{payload['machine']['torch_threads']} thread(s)); read bandwidth measured in the same run: "
             f"{payload['read_bandwidth'] / 1e9:.1f} GB/s, float32 matmul rate {payload['matmul_rate'] / 1e9:.0f} "
             "GFLOP/s.", ""]
    if payload.get("note"):
        lines += [f"Note: {payload['note']}", ""]
    steps = {}
    for p in payload["profiles"]:
        steps.setdefault(f"{p['path']} {'compiled' if p['compiled'] else 'eager'}", {})[p["context"]] = p
    contexts = payload["settings"]["contexts"]
    lines += ["### Step time and the attention matmuls' share", "",
              f"The attention matmuls: self time of {' and '.join(ATTENTION_MATMUL_OPS)}.", "",
              common.markdown_table(["variant", *(f"step ms @ {c}" for c in contexts),
                                     *(f"attention matmuls ms @ {c}" for c in contexts)],
                                    [[name, *(by[c]["step_ms"] if c in by else None for c in contexts),
                                      *(_attention_matmul_ms(by[c]["ops"]) if c in by else None for c in contexts)]
                                     for name, by in steps.items()]), ""]
    lines += ["### What grows with the context", "",
              "Extra time per 1,000 context tokens between the smallest and the largest context, against its "
              "roofline: reading those tokens' cache once at the measured bandwidth, or their attention FLOPs at the "
              "measured matmul rate, whichever is longer. Per op: its share of that growth.", ""]
    for name, g in payload["growth"].items():
        matmuls = sum(r["ms_per_1k_tokens"] for r in g["ops"] if r["op"] in ATTENTION_MATMUL_OPS)
        lines += [f"**{name}**: step +{g['step_ms_per_1k_tokens']:.3f} ms per 1k tokens; roofline "
                  f"{g['roofline_ms_per_1k_tokens']:.3f} ms (cache read {g['cache_read_ms_per_1k_tokens']:.3f}, FLOPs "
                  f"{g['flops_ms_per_1k_tokens']:.3f}): {g['step_ms_per_1k_tokens'] / g['roofline_ms_per_1k_tokens']:.1f}x; "
                  f"the attention matmuls {100 * matmuls / g['step_ms_per_1k_tokens']:.0f} % of the growth", "",
                  common.markdown_table(["op", "ms per 1k tokens", "copy"],
                                        [[_op(r["op"]), r["ms_per_1k_tokens"], "yes" if r["copy"] else ""]
                                         for r in g["ops"]]), ""]
    lines += ["### Top ops per point", ""]
    for p in payload["profiles"]:
        mode = "compiled" if p["compiled"] else "eager"
        lines += [f"**{p['path']} {mode}, context {p['context']}**: step {p['step_ms']:.1f} ms (profiled self "
                  f"time {p['profiled_ms']:.1f} ms), load average {p['load_average']}", ""]
        rows = [[_op(name), o["self_ms"], 100 * o["self_ms"] / p["profiled_ms"], o["calls"]]
                for name, o in list(p["ops"].items())[:TOP_OPS]]
        lines += [common.markdown_table(["op", "ms / step", "%", "calls / step"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.part_main("benchmarks.profile", __doc__, run, summary, argv)


if __name__ == "__main__":
    raise SystemExit(main())
