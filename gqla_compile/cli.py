"""The ``gqla-compile`` command line.

Each sub-command lives in ``gqla_compile/commands/<name>.py`` and exposes ``add_parser(subparsers)``
(which sets ``func`` on its parser) so that commands stay independent of each other. Exit codes: 0
success, 1 failure, 2 bad arguments or a missing model folder; failures print one line on stderr
(the traceback only with ``--verbose``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMANDS: tuple[str, ...] = ("convert", "export", "heal", "plan", "report", "bench", "targets", "demo")


class UsageError(Exception):
    """Bad arguments or a missing input: exit code 2.

    Raised only by the sub-commands' argument checks and turned into exit code 2 by :func:`main`, so it
    stays beside the parser rather than in ``errors.py`` (the library never raises it).
    """


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Errors about what the user asked for (exit 2), wherever they are raised: a missing or unsafe model, an
    unknown target, a model without latent attention where one is needed, an output folder in the way."""
    from .errors import (ModelNotFoundError, NoLatentAttentionError, OutputExistsError, UnknownTargetError,
                         UnsafeCheckpointError)

    return (UsageError, ModelNotFoundError, OutputExistsError, UnsafeCheckpointError, NoLatentAttentionError,
            UnknownTargetError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqla-compile",
        description="Compile latent attention (GQLA, MLA) in Hugging Face models for a target chip.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log details and show tracebacks")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gqla_compile.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not written yet must not break the others
            if exc.name != f"gqla_compile.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad arguments, as argparse does
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    usage_errors = _usage_errors()
    try:
        args.func(args)
    except usage_errors as exc:
        if args.verbose:
            raise
        print(f"gqla-compile {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's job is to turn failures into one line
        if args.verbose:
            raise
        print(f"gqla-compile {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
