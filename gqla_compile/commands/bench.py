"""``gqla-compile bench``: the benchmark suite (``python -m benchmarks``) on a given model and target.

MODEL is a local model folder (its weights are loaded) or a built-in tiny config name (random weights); it
replaces the suite's built-in benchmark shapes. ``--target`` is the chip the plan in the decode part is made
for (the cost-model validation always uses the measured ``cpu`` target: it compares with this machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UsageError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark decode speed, cache size, the cost model and prompt lookup on this machine",
        description="Run the benchmark suite (decode tokens/s and cache bytes of the unmodified model and both "
        "rewritten paths, cost-model validation, step time versus s_q, prompt lookup) on MODEL and write "
        "<out>/<part>.json and <out>/SUMMARY.md.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a local model folder with config.json, or a built-in tiny config name (tiny-gqla, ...)")
    parser.add_argument("--target", default="cpu", help="target chip the plan is made for (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="small contexts and few repeats (seconds)")
    parser.add_argument("--only", default=None,
                        help="comma-separated parts: decode, cost_model, sq, prompt_lookup, cache, compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor-compiled variants")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on shared machines)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default: %(default)s)")
    parser.set_defaults(func=run)


def _model(model: str):
    """(name, config, factory of the unmodified model) for a folder or a tiny config name."""
    from ..checkpoint import load_config, load_model
    from ..dims import is_latent_config
    from ..tiny import TINY_CONFIGS

    config = load_config(model)  # ModelNotFoundError: a usage error (cli.py)
    text = getattr(config, "get_text_config", lambda: config)()
    if not is_latent_config(text):
        raise UsageError(f"{model!r} has no latent attention (no kv_lora_rank) to benchmark; convert it first "
                         "with `gqla-compile convert`")
    if model in TINY_CONFIGS:
        def factory():
            from benchmarks.common import build_model

            return build_model(config)
    else:
        def factory():
            return load_model(model)
    return Path(model).name or model, config, factory


def run(args: argparse.Namespace) -> None:
    from gqla_compile import targets

    try:
        from benchmarks import common
        from benchmarks.__main__ import parse_only, run_suite
    except ImportError as exc:  # the benchmarks package ships with the source tree
        raise UsageError(f"the benchmarks package is not importable ({exc}); run from a source checkout") from exc
    try:
        parts = parse_only(args.only)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    target = targets.get(args.target)  # UnknownTargetError: exit 2 with the known names
    model = _model(args.model)
    common.apply_threads(args.threads)
    # convert, request and serving measure models of their own (a GQA checkpoint; a DeepSeek-V3-shaped one beside
    # vLLM; vLLM engines on a fixed GQLA checkpoint), not MODEL
    run_suite(args.out, quick=args.quick, only=[p for p in parts if p not in ("convert", "request", "serving")],
              compile=not args.no_compile, model=model, target=target)
    print(f"wrote {Path(args.out) / 'SUMMARY.md'}")
