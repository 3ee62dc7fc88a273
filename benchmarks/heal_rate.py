"""Healing rate: what distillation buys per step after a lossy TransGQLA conversion, on cheap CPU steps.

    python -m benchmarks.heal_rate --minutes 20      # SmolLM2-135M at d_R 32 / d_c 76: the conversion, then 20 min
    python -m benchmarks.heal_rate --quick           # the tiny random Llama, a few seconds

The converter's default (FreqFold, sequential calibration, o_proj least squares) is healed with
``gqla_compile.heal`` (KL to the source model, attention weights only, AdamW with warm-up and cosine decay over
the planned steps) on held-in calibration text, in small steps (``--batch-size`` x ``--seq-len`` tokens) so that
many fit in the time. The number of planned steps comes from a few timed pilot steps (on a copy) and the time
budget, so the schedule runs to its end. Held-out perplexity (the windows of ``benchmarks.convert``) is measured
at a few points of the run. The rate per 1,000 steps is measured when the run reaches 1,000 steps; otherwise the
JSON and table give it as an extrapolation, labelled so.

Writes ``heal_rate.json`` and ``heal_rate.md`` into ``benchmarks/results`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.convert import RESULTS, Setting, calibration_sequences, environment, evaluation_windows, load_source
from benchmarks.real_text import perplexity

logger = logging.getLogger(__name__)

# fractions of the planned steps after which the held-out perplexity is measured
CURVE_POINTS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
PILOT_STEPS = 3


@dataclass(frozen=True)
class HealRatePlan:
    model: str
    qk_rope_head_dim: int
    kv_lora_rank: int
    minutes: float  # healing time budget (pilot and evaluations excluded)
    batch_size: int
    seq_len: int
    lr: float
    max_steps: int


def timed_steps(model: Any, teacher: Any, texts: list[torch.Tensor], config: Any, steps: int) -> float:
    """Seconds per step of ``steps`` healing steps on a copy of ``model`` (the model itself is left unchanged)."""
    from gqla_compile.heal import heal

    pilot = copy.deepcopy(model)
    start = time.perf_counter()
    heal(pilot, teacher, texts, config=config, stop_after=steps, progress=False)
    return (time.perf_counter() - start) / steps


def run(plan: HealRatePlan) -> dict[str, Any]:
    from gqla_compile.conversion import convert
    from gqla_compile.heal import HealConfig, heal

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    setting = Setting(model=plan.model, qk_rope_head_dim=plan.qk_rope_head_dim, kv_lora_rank=plan.kv_lora_rank,
                      methods=("fit",), **({} if plan.model == "smollm2" else
                                            dict(num_samples=16, seq_len=128, eval_windows=4, eval_len=128)))
    source, tokenizer = load_source(plan.model)
    evaluation = evaluation_windows(setting, tokenizer)
    original = perplexity(source, evaluation)
    start = time.perf_counter()
    model = convert(source, kv_lora_rank=plan.kv_lora_rank, qk_rope_head_dim=plan.qk_rope_head_dim,
                    calibration=calibration_sequences(setting, tokenizer, source.config.vocab_size),
                    progress=False, dtype=torch.float32)
    convert_seconds = time.perf_counter() - start
    texts = calibration_sequences(setting, tokenizer, source.config.vocab_size,
                                  num_samples=plan.max_steps * plan.batch_size, seq_len=plan.seq_len)

    def config_for(steps: int) -> HealConfig:
        return HealConfig(steps=steps, batch_size=plan.batch_size, seq_len=plan.seq_len, lr=plan.lr,
                          warmup_steps=max(1, steps // 20))

    step_seconds = timed_steps(model, source, texts, config_for(plan.max_steps), PILOT_STEPS)
    steps = max(len(CURVE_POINTS), min(plan.max_steps, int(plan.minutes * 60 / step_seconds)))
    logger.info("pilot: %.2f s a step -> %d planned steps", step_seconds, steps)
    config = config_for(steps)
    curve = [{"step": 0, "perplexity": perplexity(model, evaluation), "seconds": 0.0}]
    losses: list[float] = []
    seconds = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for point in CURVE_POINTS:
            stop = max(1, round(steps * point))
            if stop <= curve[-1]["step"]:
                continue
            start = time.perf_counter()
            result = heal(model, source, texts, config=config, checkpoint_dir=Path(folder) / "heal",
                          checkpoint_every=0, stop_after=stop, progress=False)
            seconds += time.perf_counter() - start
            losses += result.losses
            curve.append({"step": stop, "perplexity": perplexity(model, evaluation), "seconds": seconds,
                          "mean_loss_since_last_point": sum(result.losses) / len(result.losses)})
            logger.info("step %d: perplexity %.2f (original %.2f), %.0f s", stop, curve[-1]["perplexity"],
                        original, seconds)
    half = next(point for point in curve if point["step"] >= steps // 2)
    per_1000 = (curve[0]["perplexity"] - curve[-1]["perplexity"]) * 1000 / steps
    per_1000_late = (half["perplexity"] - curve[-1]["perplexity"]) * 1000 / max(steps - half["step"], 1)
    return {**asdict(plan), "environment": environment(), "perplexity_original": original,
            "convert_seconds": convert_seconds, "pilot_seconds_per_step": step_seconds, "steps": steps,
            "tokens_per_step": plan.batch_size * plan.seq_len, "heal_seconds": seconds,
            "seconds_per_step": seconds / steps, "heal_windows": len(texts), "warmup_steps": config.warmup_steps,
            "curve": curve, "losses": losses,
            "perplexity_drop_per_1000_steps": per_1000, "perplexity_drop_per_1000_steps_second_half": per_1000_late,
            "per_1000_steps_is": "measured" if steps >= 1000 else f"extrapolated linearly from {steps} steps"}


def markdown(result: dict[str, Any]) -> str:
    r = result
    lines = [
        "# Healing rate (benchmarks/heal_rate.py)\n",
        f"{r['model']} converted at d_R {r['qk_rope_head_dim']} / d_c {r['kv_lora_rank']} (FreqFold, sequential, "
        f"o_proj least squares), then healed: KL to the source, attention weights only, AdamW lr {r['lr']}, "
        f"{r['warmup_steps']} warm-up steps, cosine decay over {r['steps']} steps of {r['batch_size']} x "
        f"{r['seq_len']} = {r['tokens_per_step']} tokens of held-in calibration text. Held-out perplexity "
        f"(original {r['perplexity_original']:.2f}) on the windows of benchmarks/convert.py. "
        f"{r['seconds_per_step']:.2f} s a step on one core of the shared machine (load in the JSON).\n",
        "| step | perplexity | ratio to original | mean KL since the previous point | healing s |",
        "|---|---|---|---|---|",
    ]
    for point in r["curve"]:
        loss = point.get("mean_loss_since_last_point")
        lines.append(f"| {point['step']} | {point['perplexity']:.2f} | {point['perplexity'] / r['perplexity_original']:.2f} "
                     f"| {'' if loss is None else f'{loss:.4f}'} | {point['seconds']:.0f} |")
    lines.append(f"\nPerplexity drop per 1,000 steps: {r['perplexity_drop_per_1000_steps']:.2f} over the whole run, "
                 f"{r['perplexity_drop_per_1000_steps_second_half']:.2f} at the rate of its second half "
                 f"({r['per_1000_steps_is']}; the gain per step shrinks as the run goes on, so a linear "
                 "extrapolation overstates what more steps buy).\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama (byte tokens), a few seconds")
    parser.add_argument("--minutes", type=float, default=20.0, help="healing time budget")
    parser.add_argument("--setting", default="32x76", help="d_R x d_c")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    d_r, d_c = (8, 32) if args.quick else (int(n) for n in args.setting.split("x"))
    plan = HealRatePlan(model="tiny" if args.quick else "smollm2", qk_rope_head_dim=d_r, kv_lora_rank=d_c,
                        minutes=0.1 if args.quick else args.minutes, batch_size=args.batch_size,
                        seq_len=args.seq_len, lr=args.lr, max_steps=16 if args.quick else args.max_steps)
    result = run(plan)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heal_rate.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "heal_rate.md").write_text(markdown(result))
    logger.info("wrote %s", args.out / "heal_rate.json")


if __name__ == "__main__":
    main()
