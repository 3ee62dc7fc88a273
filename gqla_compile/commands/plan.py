"""``gqla-compile plan``: the cost model's choice of decoding path for a model on a target chip."""

from __future__ import annotations

import argparse
import json

from ..cli import UsageError
from ..paths import PATHS, ROPE_KEYS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="predict both decoding paths' cost for a model on a target and pick one",
        description="Cost the absorbed-MQA and grouped-GQA decoding paths of a latent-attention model for one "
        "decode step on a target chip (roofline: bytes over bandwidth vs FLOPs over peak, per part) and say "
        "which path is faster and why. Changes nothing.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a local model folder with config.json, or a built-in tiny config name (tiny-gqla, ...)")
    parser.add_argument("--target", default="auto", help="target chip name (see `gqla-compile targets`), or auto")
    parser.add_argument("--s-q", type=int, default=1, help="tokens decoded per sequence and step (2 for MTP)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--context", type=int, default=4096, help="tokens of context each sequence attends to")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16, float32 or float8 (default: the model's)")
    parser.add_argument("--path", default="auto", choices=("auto", *PATHS), help="force a path (both are costed)")
    parser.add_argument("--rope-key", default="auto", choices=("auto", *ROPE_KEYS),
                        help="grouped cache: RoPE key copied into every group, kept once, or auto (the faster)")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..checkpoint import load_config
    from ..cost_model import plan
    from ..targets import names

    for name in ("s_q", "batch", "context", "tp"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.target != "auto" and args.target.lower() not in names():
        raise UsageError(f"unknown target {args.target!r}; known targets: {', '.join(names())}")
    config = load_config(args.model)  # ModelNotFoundError: a usage error (cli.py)
    try:
        result = plan(config, args.target, s_q=args.s_q, batch_size=args.batch, context_len=args.context, tp=args.tp,
                      dtype=args.dtype, path=args.path, rope_key=args.rope_key)
    except ValueError as exc:  # arguments the model cannot take (a tp that splits no path, ...)
        raise UsageError(str(exc)) from exc
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.explain())
