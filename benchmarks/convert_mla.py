"""TransGQLA for MLA checkpoints: held-out perplexity of an MLA model regrouped into fewer latent groups.

    python -m benchmarks.convert_mla            # trains a small DeepSeek-V3 (MLA) model (a few minutes, cached)
    python -m benchmarks.convert_mla --quick    # a tiny one, seconds

No pretrained MLA model installs here, so one is trained: transformers' ``DeepseekV3ForCausalLM`` with dense
MLP layers (no MoE), on UTF-8 bytes of the Python standard library's own sources (``real_text``: calibration
files for training and calibration, held-out files for evaluation), fixed seed. It is then converted with
``gqla_compile.convert(model, num_groups=n_g, ...)`` at n_g in {n_h, n_h/2, n_h/4, n_h/8}, with neighbour or
similarity grouping, with and without loss weighting (and the score-aware PCA), and each result's held-out
perplexity is compared with the original's, next to the grouped-path KV cache it needs.

Writes ``convert_mla.json`` and ``convert_mla.md`` into ``benchmarks/results`` (or ``--out``). The trained model is
cached in ``~/.cache/gqla_compile/`` (``--retrain`` ignores the cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.real_text import byte_tokens, perplexity, stdlib_text

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
CACHE = Path(os.environ.get("GQLA_CACHE_DIR", Path.home() / ".cache" / "gqla_compile"))


@dataclass(frozen=True)
class Setup:
    """Model shape, training and measurement sizes of one run."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    train_steps: int
    train_batch: int
    seq_len: int
    learning_rate: float
    train_chars: int
    calibration_samples: int
    eval_windows: int
    seed: int = 0


FULL = Setup(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, kv_lora_rank=64,
             qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, train_steps=300, train_batch=16, seq_len=128,
             learning_rate=3e-3, train_chars=3_000_000, calibration_samples=64, eval_windows=64)
QUICK = Setup(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16,
              qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, train_steps=10, train_batch=4, seq_len=32,
              learning_rate=3e-3, train_chars=50_000, calibration_samples=4, eval_windows=4)
FULL_OPTIONS = [
    {"grouping": "neighbour"},
    {"grouping": "similarity"},
    {"grouping": "neighbour", "weighting": "loss"},
    {"grouping": "similarity", "weighting": "loss"},
    {"grouping": "similarity", "score_aware": True},
    {"grouping": "similarity", "weighting": "loss", "score_aware": True},
]
QUICK_OPTIONS = [{"grouping": "neighbour"}, {"grouping": "similarity"}, {"grouping": "similarity", "weighting": "loss"}]


def model_config(setup: Setup):
    from transformers import DeepseekV3Config

    layers = setup.num_hidden_layers
    return DeepseekV3Config(
        vocab_size=256, hidden_size=setup.hidden_size, intermediate_size=setup.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=setup.num_attention_heads,
        num_key_value_heads=setup.num_attention_heads, kv_lora_rank=setup.kv_lora_rank, q_lora_rank=None,
        qk_rope_head_dim=setup.qk_rope_head_dim, qk_nope_head_dim=setup.qk_nope_head_dim, v_head_dim=setup.v_head_dim,
        first_k_dense_replace=layers, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, n_group=1, topk_group=1, num_mtp_layers=0, max_position_embeddings=4 * setup.seq_len,
        tie_word_embeddings=False, rope_interleave=True,
    )


def _cache_key(setup: Setup) -> str:
    import transformers

    text = json.dumps({**asdict(setup), "torch": torch.__version__, "transformers": transformers.__version__},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train(setup: Setup, tokens: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """A DeepseekV3ForCausalLM trained on random windows of ``tokens`` (AdamW, warm-up then cosine)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(setup.seed)
    model = AutoModelForCausalLM.from_config(model_config(setup))
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, setup.train_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, setup.train_steps) / setup.train_steps)))
    generator = torch.Generator().manual_seed(setup.seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(setup.train_steps):
        starts = torch.randint(0, tokens.numel() - setup.seq_len - 1, (setup.train_batch,), generator=generator)
        batch = torch.stack([tokens[s : s + setup.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == setup.train_steps - 1:
            logger.info("train step %d/%d loss %.3f", step + 1, setup.train_steps, losses[-1])
    model.eval()
    return model, {"seconds": time.perf_counter() - start, "final_loss": sum(losses[-10:]) / len(losses[-10:])}


def trained_model(setup: Setup, tokens: torch.Tensor, *, use_cache: bool) -> tuple[Any, dict[str, Any]]:
    """The trained model, from the cache folder when it holds this setup's (same shapes, steps, versions)."""
    from transformers import AutoModelForCausalLM

    folder = CACHE / f"convert_mla-{_cache_key(setup)}"
    if use_cache and (folder / "training.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32).eval()
        return model, {**json.loads((folder / "training.json").read_text()), "cached": True}
    model, info = train(setup, tokens)
    if use_cache:
        from gqla_compile.checkpoint import save_pretrained_atomic

        save_pretrained_atomic(model, folder, force=True)
        (folder / "training.json").write_text(json.dumps(info))
    return model, {**info, "cached": False}


def option_name(options: dict[str, Any]) -> str:
    parts = [options.get("grouping", "neighbour")]
    if options.get("weighting"):
        parts.append(f"{options['weighting']}-weighted")
    if options.get("score_aware"):
        parts.append("score-aware")
    return " + ".join(parts)


@torch.no_grad()
def logits_error(source: Any, converted: Any, windows: torch.Tensor) -> float:
    num = den = 0.0
    for start in range(0, windows.shape[0], 8):
        ids = windows[start : start + 8]
        a = source(input_ids=ids, use_cache=False).logits.double()
        b = converted(input_ids=ids, use_cache=False).logits.double()
        num += float((a - b).square().sum())
        den += float(a.square().sum())
    return math.sqrt(num / den)


def run(setup: Setup, option_sets: list[dict[str, Any]], *, use_cache: bool = True) -> dict[str, Any]:
    import gqla_compile
    from gqla_compile.conversion.calibration import token_chunks
    from gqla_compile.cache_sizes import kv_cache_elements

    torch.manual_seed(setup.seed)
    train_tokens = torch.tensor(byte_tokens(stdlib_text("calibration", setup.train_chars)), dtype=torch.long)
    eval_ids = byte_tokens(stdlib_text("evaluation", setup.seq_len * setup.eval_windows * 4))
    eval_windows = token_chunks(eval_ids, setup.eval_windows, setup.seq_len)
    eval_windows = torch.stack(eval_windows)
    # calibration windows: spread over the held-in (training) text, never the evaluation files
    calibration = token_chunks(train_tokens.tolist(), setup.calibration_samples, setup.seq_len)

    source, training = trained_model(setup, train_tokens, use_cache=use_cache)
    original = perplexity(source, eval_windows)
    n_h, layers = setup.num_attention_heads, setup.num_hidden_layers
    bytes_per = 2  # bf16 cache
    source_grouped = kv_cache_elements(source.config, "grouped")
    rows = []
    groups = [n_h // d for d in (1, 2, 4, 8) if n_h % d == 0]
    for num_groups in groups:
        for options in option_sets:
            start = time.perf_counter()
            converted = gqla_compile.convert(source, num_groups=num_groups, calibration=calibration, progress=False,
                                             output="gqla", **options)  # the compact form: exact for this dense model
            seconds = time.perf_counter() - start
            ppl = perplexity(converted, eval_windows)
            grouped = kv_cache_elements(converted.config, "grouped")
            record = converted.config.conversion["layers"]
            rows.append({
                "num_groups": num_groups,
                "option": option_name(options),
                **{k: options.get(k) for k in ("grouping", "weighting")},
                "score_aware": bool(options.get("score_aware")),
                "perplexity": ppl,
                "perplexity_ratio": ppl / original,
                "logits_relative_error": logits_error(source, converted, eval_windows),
                "key_kept_energy": sum(r["key_kept_energy"] for r in record) / len(record),
                "value_kept_energy": sum(r["value_kept_energy"] for r in record) / len(record),
                "groups_layer0": record[0]["groups"],
                "grouped_cache_elements_per_token_layer": grouped,
                "grouped_cache_bytes_per_token": grouped * layers * bytes_per,
                "grouped_cache_share_of_original": grouped / source_grouped,
                "absorbed_cache_bytes_per_token": kv_cache_elements(converted.config, "absorbed") * layers * bytes_per,
                "convert_seconds": seconds,
            })
            logger.info("n_g=%d %-40s ppl %.4f (original %.4f)", num_groups, option_name(options), ppl, original)
    return {
        "benchmark": "convert_mla",
        "model": {"class": type(source).__name__, **asdict(setup), "parameters": sum(p.numel() for p in source.parameters())},
        "training": training,
        "data": {"text": "Python standard library sources (benchmarks/real_text.py), UTF-8 bytes as tokens",
                 "train_tokens": train_tokens.numel(), "calibration": [len(calibration), setup.seq_len],
                 "evaluation": list(eval_windows.shape)},
        "original_perplexity": original,
        "original_grouped_cache_bytes_per_token": source_grouped * layers * bytes_per,
        "cache_dtype": "bfloat16 (2 bytes), RoPE key copied into every group (a stock GQA kernel's layout)",
        "rows": rows,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
    }


def markdown(result: dict[str, Any]) -> str:
    setup = result["model"]
    options = list(dict.fromkeys(row["option"] for row in result["rows"]))
    by = {(row["num_groups"], row["option"]): row for row in result["rows"]}
    groups = sorted({row["num_groups"] for row in result["rows"]}, reverse=True)
    lines = [
        "# TransGQLA for MLA checkpoints: held-out perplexity after regrouping",
        "",
        f"Model: {setup['class']} trained here ({setup['parameters'] / 1e6:.2f} M parameters, {setup['num_hidden_layers']} "
        f"layers, hidden {setup['hidden_size']}, n_h = {setup['num_attention_heads']}, d_c = {setup['kv_lora_rank']}, "
        f"d_R = {setup['qk_rope_head_dim']}, d_n = {setup['qk_nope_head_dim']}, d_v = {setup['v_head_dim']}; "
        f"{setup['train_steps']} steps of {setup['train_batch']} x {setup['seq_len']} bytes, final training loss "
        f"{result['training']['final_loss']:.3f}) on the Python standard library's sources (bytes as tokens). "
        f"Calibration: {result['data']['calibration'][0]} x {result['data']['calibration'][1]} held-in bytes; "
        f"evaluation: {result['data']['evaluation'][0]} x {result['data']['evaluation'][1]} bytes of held-out files.",
        "",
        f"Original (MLA, n_g = n_h = {setup['num_attention_heads']}) perplexity: **{result['original_perplexity']:.4f}**; "
        f"its grouped-path cache: {result['original_grouped_cache_bytes_per_token']} bytes per token "
        f"({result['cache_dtype']}). The absorbed path's cache (latent + RoPE key) is unchanged by regrouping: "
        f"{result['rows'][0]['absorbed_cache_bytes_per_token']} bytes per token.",
        "",
        "Held-out perplexity (ratio to the original):",
        "",
        "| n_g | grouped cache B/token (share) | " + " | ".join(options) + " |",
        "|---:|---:|" + "---:|" * len(options),
    ]
    for g in groups:
        first = by[(g, options[0])]
        cells = [f"{by[(g, o)]['perplexity']:.4f} ({by[(g, o)]['perplexity_ratio']:.3f})" if (g, o) in by else "" for o in options]
        lines.append(f"| {g} | {first['grouped_cache_bytes_per_token']} ({first['grouped_cache_share_of_original']:.3f}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "Relative error of the logits on the evaluation windows:", "",
              "| n_g | " + " | ".join(options) + " |", "|---:|" + "---:|" * len(options)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(f"{by[(g, o)]['logits_relative_error']:.4f}" if (g, o) in by else "" for o in options) + " |")
    lines += ["", "Layer 0's groups with similarity grouping: "
              + "; ".join(f"n_g = {g}: {by[(g, 'similarity')]['groups_layer0']}" for g in groups if (g, "similarity") in by and g not in (1, setup["num_attention_heads"])),
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few training steps (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for convert_mla.json / convert_mla.md")
    parser.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    setup, options = (QUICK, QUICK_OPTIONS) if args.quick else (FULL, FULL_OPTIONS)
    result = run(setup, options, use_cache=not args.quick and not args.retrain)
    result["mode"] = "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convert_mla.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "convert_mla.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
