"""``gqla-compile heal``: distil the source model into a converted one (KL on logits), resumable.

Exit codes (cli.py): 2 for a missing model or text file, an existing destination without ``--force``, or bad
settings (nothing is written then); 1 for other failures.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli import UsageError

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..heal import HealConfig

    defaults = HealConfig()
    parser = subparsers.add_parser(
        "heal",
        help="distil the source model into a converted (GQLA) model to recover quality lost in conversion",
        description="Train the converted model's attention weights (or all, --train all) to match the source "
        "model's next-token distribution (KL) on TEXT_FILE; checkpoints in DST_DIR.checkpoint make the run "
        "resumable; the healed model is written to DST_DIR.",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="the converted model folder")
    parser.add_argument("teacher", metavar="TEACHER_DIR", help="the source model folder")
    parser.add_argument("text", metavar="TEXT_FILE", type=Path, help="UTF-8 training text")
    parser.add_argument("dst", metavar="DST_DIR", help="output folder (must not exist unless --force)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--hidden-weight", type=float, default=defaults.hidden_weight,
                        help="weight of per-layer hidden-state matching (default 0: logits only)")
    parser.add_argument("--train", choices=("attention", "all"), default=defaults.trainable)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="replace DST_DIR if it exists (only once complete)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..checkpoint import ModelNotFoundError, check_output_free, load_model, load_tokenizer, save_pretrained_atomic
    from ..heal import HealConfig, HealError, heal

    try:
        check_output_free(args.dst, force=args.force)
        model, teacher = load_model(args.model), load_model(args.teacher)
    except (FileExistsError, ModelNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    if not args.text.is_file():
        raise UsageError(f"text file {str(args.text)!r} does not exist")
    tokenizer = load_tokenizer(Path(args.model)) or load_tokenizer(Path(args.teacher))
    if tokenizer is None:
        raise UsageError("neither MODEL_DIR nor TEACHER_DIR has a tokenizer to read TEXT_FILE with")
    config = HealConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        warmup_steps=args.warmup_steps, hidden_weight=args.hidden_weight, trainable=args.train,
                        seed=args.seed)
    try:
        result = heal(model, teacher, [args.text.read_text(encoding="utf-8")], tokenizer=tokenizer, config=config,
                      checkpoint_dir=f"{args.dst}.checkpoint", checkpoint_every=args.checkpoint_every,
                      progress=not args.quiet, device=args.device)
    except HealError as exc:
        raise UsageError(str(exc)) from exc
    save_pretrained_atomic(model.to("cpu"), args.dst, force=args.force, tokenizer=tokenizer)
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"), float("nan"))
    print(f"healed {args.model} -> {args.dst}: {result.step} steps (resumed from {result.resumed_from}), "
          f"distillation loss {first:.4f} -> {last:.4f}")
