"""The benchmark suite: one entry point for every part, each writing ``<out>/<part>.json``, and a Markdown
summary ``<out>/SUMMARY.md`` with the machine, the load and every part's tables.

    python -m benchmarks [--quick] [--only decode,cost_model,sq,prompt_lookup,dsa,request,serving,cache,compile,convert]
                         [--no-compile] [--threads 1] [--out benchmarks/results]

``cache`` and ``compile`` are reported by the decode part (cache bytes per token, optimize and first-call
times), so naming either runs decode. ``convert`` is the TransGQLA conversion benchmark
(``benchmarks/convert.py``), run through its own ``main(argv)`` when that module is present. ``serving`` is
vLLM serving (``benchmarks/serving.py``): its engines run under ``$GQLA_VLLM_PYTHON`` (a Python with vLLM and
this package), else .ci/run's .venv-vllm, else this Python if it imports vLLM; without one its vLLM rows are recorded as skipped.
The same suite runs as ``gqla-compile bench MODEL --target T``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import common

PARTS: tuple[str, ...] = ("decode", "cost_model", "sq", "prompt_lookup", "dsa", "request", "serving", "convert")
ALIASES = {"cache": "decode", "compile": "decode", "compile_time": "decode"}


def parse_only(text: str | None) -> list[str]:
    """The parts named by ``--only`` (aliases resolved, suite order kept); all parts when None."""
    if not text:
        return list(PARTS)
    names = [ALIASES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; known: {', '.join([*PARTS, *ALIASES])}")
    return [p for p in PARTS if p in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--only", default=None, help="comma-separated parts (default: all): "
                        + ", ".join([*PARTS, *ALIASES]))
    return parser


def run_suite(out: str | Path, *, quick: bool = False, only: Sequence[str] | None = None, compile: bool = True,
              pools: dict[str, Any] | None = None, model: str | None = None, target: Any = "cpu",
              log=print) -> dict[str, Any]:
    """Run the parts and write the summary; returns {part: payload} (a part's error is recorded, not raised,
    unless every part fails)."""
    from . import cost_model, decode, dsa, prompt_lookup, request, serving, sq

    parts = list(only) if only else list(PARTS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    modules = {"decode": decode, "cost_model": cost_model, "sq": sq, "prompt_lookup": prompt_lookup}
    pools = pools if pools is not None else {}
    if model is not None:  # a user's model (name, config, factory) replaces the shapes: gqla-compile bench MODEL
        main_pool = grid = common.ModelPool(quick=quick, target=target, custom=model)
    else:
        main_pool = pools.get("main") or common.ModelPool(quick=quick, target=target)
        # quick models already have the grid's 2 layers: one pool, each model optimized once
        grid = pools.get("grid") or (main_pool if quick else cost_model.grid_pool(quick))
    grid_runs = common.Measurements(grid, budget_s=cost_model.settings(quick)["budget_s"])
    payloads: dict[str, Any] = {}
    timings: dict[str, float] = {}
    start_machine = common.machine_info()
    for part in parts:
        start = time.perf_counter()
        log(f"[benchmarks] {part} ... (load {common.load_average()})")
        try:
            if part == "convert":
                payloads[part] = _run_convert(out, quick)
            elif part == "dsa":  # its own DSA model (sparse attention), eager
                payloads[part] = dsa.run(str(out), quick=quick)
            elif part == "request":  # its own DeepSeek-V3-shaped model; quick mode runs eagerly, without vLLM
                payloads[part] = request.run(str(out), quick=quick, compile=None if quick else compile, log=log)
            elif part == "serving":  # its own checkpoint, vLLM engines in their own processes
                payloads[part] = serving.run(str(out), quick=quick, compile=compile)
            elif part in ("cost_model", "sq"):
                payloads[part] = modules[part].run(str(out), quick=quick, compile=compile, pool=grid,
                                                   measurements=grid_runs)
            else:
                payloads[part] = modules[part].run(str(out), quick=quick, compile=compile, pool=main_pool)
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' results
            logging.getLogger(__name__).exception("benchmark part %s failed", part)
            payloads[part] = {"error": f"{type(exc).__name__}: {exc}"}
        timings[part] = time.perf_counter() - start
        log(f"[benchmarks] {part} done in {timings[part]:.0f} s")
    write_summary(out, payloads, start_machine, timings, quick)
    if payloads and all("error" in p for p in payloads.values()):
        raise RuntimeError("every benchmark part failed: " + "; ".join(f"{k}: {v['error']}" for k, v in payloads.items()))
    return payloads


def _run_convert(out: Path, quick: bool) -> dict[str, Any]:
    try:
        module = importlib.import_module("benchmarks.convert")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks.convert":
            raise
        return {"skipped": "benchmarks/convert.py is not present"}
    argv = ["--out", str(out), *(["--quick"] if quick else [])]
    code = module.main(argv)
    path = out / "convert.json"
    payload = {"exit_code": code}
    if path.is_file():
        import json

        payload["result"] = json.loads(path.read_text())
    return payload


def write_summary(out: Path, payloads: dict[str, Any], machine: dict[str, Any], timings: dict[str, float],
                  quick: bool) -> Path:
    from . import cost_model, decode, dsa, prompt_lookup, request, serving, sq

    summaries = {"decode": decode.summary, "cost_model": cost_model.summary, "sq": sq.summary,
                 "prompt_lookup": prompt_lookup.summary, "dsa": dsa.summary, "request": request.summary,
                 "serving": serving.summary}
    lines = [
        "# Benchmark results" + (" (quick mode: tiny models, not representative)" if quick else ""), "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch thread(s); "
        f"torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}; "
        f"started {machine['time']} with load average {machine['load_average']} (1/5/15 min), ended with "
        f"{common.load_average()}. The machine is shared: timings are medians over repeats (spread in the JSON "
        "files and the min-max columns); comparisons are ratios taken in the same run.", "",
    ]
    if timings:
        lines += [common.markdown_table(["part", "seconds"], [[p, round(t)] for p, t in timings.items()]), ""]
    for part, payload in payloads.items():
        if "error" in payload:
            lines += [f"## {part}", "", f"Failed: `{payload['error']}`", ""]
        elif part in summaries:
            lines += [summaries[part](payload)]
            if "machine" in payload:
                m = payload["machine"]
                lines += [f"_Part measured from {m['time']}: load average {m['load_average']} at its start, "
                          f"{payload.get('load_average_after')} at its end; {m['torch_threads']} torch thread(s)._", ""]
        elif part == "convert":
            lines += ["## Conversion (benchmarks/convert.py)", "",
                      payload.get("skipped") or f"See `convert.json` (exit code {payload.get('exit_code')}).", ""]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def summary_from_files(out: str | Path) -> Path:
    """Rewrite ``<out>/SUMMARY.md`` from the part JSONs already in ``out`` (parts run separately)."""
    import json

    out = Path(out)
    payloads = {p: json.loads((out / f"{p}.json").read_text()) for p in PARTS if (out / f"{p}.json").is_file()}
    if not payloads:
        raise FileNotFoundError(f"no part results (<part>.json) in {out}")
    machine = next(iter(payloads.values())).get("machine") or common.machine_info()
    quick = any(p.get("quick") for p in payloads.values())
    parts = {p: v for p, v in payloads.items() if p != "convert"}
    if "convert" in payloads:
        parts["convert"] = {"exit_code": 0, "result": payloads["convert"]}
    return write_summary(out, parts, machine, {}, quick)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--summary-only", action="store_true",
                        help="measure nothing: rewrite SUMMARY.md from the <part>.json files in --out")
    args = parser.parse_args(argv)
    if args.summary_only:
        print(f"[benchmarks] wrote {summary_from_files(args.out)}")
        return 0
    try:
        parts = parse_only(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    common.apply_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    run_suite(args.out, quick=args.quick, only=parts, compile=not args.no_compile)
    print(f"[benchmarks] wrote {Path(args.out) / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
