"""``gqla-compile report``: the graph-diff report of a model optimized (as a dry run) for a target chip."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import UsageError
from ..paths import PATHS

FORMATS = ("text", "md", "html", "json")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="show what optimize finds, chooses and rewrites in a model (graph-diff report)",
        description="Optimize a copy of MODEL for a target chip (eager, no Inductor) and report per layer: the "
        "latent attention found, the path chosen and why, the op histograms and graph diff before and after, "
        "the folded weights, the cache before and after, and a roofline chart (html).",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a local model folder (config.json + safetensors) or a built-in tiny config name")
    parser.add_argument("--target", required=True, help="target chip name (see `gqla-compile targets`), or auto")
    parser.add_argument("--path", default="auto", choices=("auto", *PATHS), help="force a path")
    parser.add_argument("--s-q", type=int, default=1, help="tokens decoded per sequence and step (2 for MTP)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--context", type=int, default=4096, help="tokens of context each sequence attends to")
    parser.add_argument("--format", default="text", help=f"output format: {', '.join(FORMATS)} (html needs --output)")
    parser.add_argument("--output", "-o", default=None, help="write the report to this file instead of stdout")
    parser.add_argument("--full", action="store_true", help="text format: full op histograms and the graph diff")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.format not in FORMATS:
        raise UsageError(f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.format == "html" and not args.output:
        raise UsageError("--format html writes a file: give --output PATH")
    for name in ("s_q", "batch", "context"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise UsageError(f"the folder of --output {args.output!r} does not exist")
    from ..checkpoint import load_model
    from ..reporting import report
    from ..targets import names

    if args.target != "auto" and args.target.lower() not in names():
        raise UsageError(f"unknown target {args.target!r}; known: {', '.join(names())}")
    model = load_model(args.model)  # ModelNotFoundError: a usage error (cli.py)
    result = report(model, target=args.target, path=args.path, s_q=args.s_q, batch_size=args.batch,
                    context_len=args.context)
    if args.format == "html":
        result.to_html(args.output)
        print(f"wrote {args.output}")
        return
    text = {"text": lambda: result.to_text(verbose=args.full), "md": result.to_markdown,
            "json": result.to_json}[args.format]()
    if args.output:
        Path(args.output).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
