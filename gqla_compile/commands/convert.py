"""``gqla-compile convert``: TransGQLA of a GQA checkpoint folder into a GQLA checkpoint folder.

Exit codes (cli.py): 2 for a missing source, an existing destination without ``--force`` and ranks or an
architecture the conversion cannot take (nothing is written then); 1 for other failures.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..cli import UsageError
from ..conversion.calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, random_token_sequences, token_chunks

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "float64")
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a GQA checkpoint (Llama, Qwen2, Mistral) into a GQLA checkpoint (TransGQLA)",
        description="TransGQLA: split each layer's keys into a shared RoPE part (RoRoPE) and a no-RoPE part, "
        "compress the no-RoPE keys and values of all groups jointly into a latent (PCA on calibration "
        "activations), and write a GQLA checkpoint (safetensors) into DST_DIR.",
    )
    parser.add_argument("src", metavar="SRC_DIR", help="source model folder (safetensors), or a tiny config name")
    parser.add_argument("dst", metavar="DST_DIR", help="output folder (must not exist unless --force)")
    parser.add_argument("--kv-lora-rank", type=int, default=512, help="latent rank d_c (default 512)")
    parser.add_argument("--qk-rope-head-dim", type=int, default=64, help="shared RoPE key dims d_R (default 64)")
    parser.add_argument("--calibration-file", type=Path, default=None,
                        help="UTF-8 text to calibrate on (default: random token ids, poor quality)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder for --calibration-file (default: SRC_DIR's); saved into DST_DIR")
    parser.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random calibration tokens")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the output (default: the source's)")
    parser.add_argument("--force", action="store_true", help="replace DST_DIR if it exists (only once complete)")
    gqa = parser.add_argument_group("GQA sources (TransGQLA quality options)")
    gqa.add_argument("--rope-band-size", default="auto",
                     help="FreqFold band size, a power of two, or 'auto' (default: chosen per layer on calibration "
                     "data; 1 when --qk-rope-head-dim is n_kv * head dim, where that is exact)")
    gqa.add_argument("--rope-allocation", choices=("freqfold", "energy"), default="freqfold",
                     help="'energy': rank rotated pairs by key energy across frequencies, one ranking for all "
                     "layers (a baseline)")
    gqa.add_argument("--balance", choices=("auto", "rms"), default="auto",
                     help="key/value weighting in the joint PCA: 'auto' (default) picks per layer, on calibration "
                     "data, the RMS-norm ratio or half or twice it; 'rms': the RMS-norm ratio")
    gqa.add_argument("--no-sequential", action="store_true",
                     help="calibrate every layer on the source model's activations (default: on the outputs of the "
                     "layers converted before it)")
    gqa.add_argument("--no-fit-output", action="store_true",
                     help="skip the least-squares refit of o_proj to the source attention's output")
    gqa.add_argument("--fit-steps", type=int, default=0,
                     help="Adam steps per layer refining its attention weights against the source's output")
    latent = parser.add_argument_group(
        "latent-attention sources (MLA: DeepSeek-V2/V3 and alike, or GQLA)",
        "regroup the per-head (or per-group) up-projections into fewer groups; the latent and RoPE key stay, "
        "--kv-lora-rank and --qk-rope-head-dim are then the source's own",
    )
    latent.add_argument("--num-groups", type=int, default=None,
                        help="latent groups n_g of the result, a divisor of the query heads (default: the source's)")
    latent.add_argument("--grouping", choices=("neighbour", "similarity"), default=None,
                        help="which heads share a group: consecutive ones (default) or those of most similar "
                        "key/value subspaces")
    latent.add_argument("--weighting", choices=("loss",), default=None,
                        help="weight calibration tokens by the source model's next-token loss")
    latent.add_argument("--score-aware", action="store_true",
                        help="weight the per-group PCA by the heads' query statistics and output projections")
    parser.set_defaults(func=run)


def _calibration(args: argparse.Namespace, tokenizer: Any, vocab_size: int) -> list:
    """Token sequences from --calibration-file, or random token ids (with a warning)."""
    if args.num_samples <= 0 or args.seq_len <= 0:
        raise UsageError(f"--num-samples ({args.num_samples}) and --seq-len ({args.seq_len}) must be positive")
    if args.calibration_file is None:
        logger.warning("no --calibration-file: calibrating on random token ids; conversion quality needs real text")
        return random_token_sequences(vocab_size, args.num_samples, args.seq_len, seed=args.seed)
    if not args.calibration_file.is_file():
        raise UsageError(f"calibration file {str(args.calibration_file)!r} does not exist")
    if tokenizer is None:
        raise UsageError("--calibration-file needs a tokenizer: SRC_DIR has none, pass --tokenizer DIR")
    text = args.calibration_file.read_text(encoding="utf-8")
    return token_chunks(tokenizer(text)["input_ids"], args.num_samples, args.seq_len)


def gqa_options(args: argparse.Namespace) -> dict[str, Any]:
    """convert() keywords of the GQA-source options the user changed (the others keep convert's defaults)."""
    band = args.rope_band_size
    if band != "auto":
        try:
            band = int(band)
        except ValueError as exc:
            raise UsageError(f"--rope-band-size must be a power of two or 'auto', got {band!r}") from exc
    options = {"rope_band_size": band, "rope_allocation": args.rope_allocation, "sequential": not args.no_sequential,
               "fit_output": not args.no_fit_output, "fit_steps": args.fit_steps, "balance": args.balance}
    defaults = {"rope_band_size": "auto", "rope_allocation": "freqfold", "sequential": True, "fit_output": True,
                "fit_steps": 0, "balance": "auto"}
    return {name: value for name, value in options.items() if value != defaults[name]}


def run(args: argparse.Namespace) -> None:
    from ..checkpoint import ModelNotFoundError, check_output_free, load_model, load_tokenizer, save_pretrained_atomic
    from ..conversion import convert
    from ..dims import is_latent_config
    from ..cache_sizes import kv_cache_elements
    from ..errors import ConversionError

    try:
        check_output_free(args.dst, force=args.force)
        source = load_model(args.src)
    except (FileExistsError, ModelNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    src_folder = Path(args.src) if Path(args.src).is_dir() else None
    tokenizer = load_tokenizer(args.tokenizer or src_folder)
    calibration = _calibration(args, tokenizer, source.config.vocab_size)
    latent_options = {name: value for name, value in (("grouping", args.grouping), ("weighting", args.weighting),
                                                      ("score_aware", args.score_aware)) if value}
    latent_options.update(gqa_options(args))
    try:
        model = convert(source, kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.qk_rope_head_dim,
                        calibration=calibration, dtype=args.dtype, progress=not args.quiet, seed=args.seed,
                        num_groups=args.num_groups, **latent_options)
    except ConversionError as exc:
        raise UsageError(str(exc)) from exc
    save_pretrained_atomic(model, args.dst, force=args.force, tokenizer=tokenizer)
    if is_latent_config(source.config):
        before, after = kv_cache_elements(source.config, "grouped"), kv_cache_elements(model.config, "grouped")
        record = getattr(model.config, "gqla_conversion", None) or model.config.conversion
        print(f"converted {args.src} ({type(source).__name__}, {record['source_num_groups']} groups) -> {args.dst} "
              f"({type(model).__name__}, {record['num_groups']} groups, {record['grouping']} grouping): grouped-path KV "
              f"cache per token and layer {before} -> {after} elements ({100 * after / before:.2f} %); the "
              "absorbed path's latent cache is unchanged")
        return
    before = kv_cache_elements(source.config, "original")
    after = kv_cache_elements(model.config, "absorbed")
    print(f"converted {args.src} ({type(source).__name__}) -> {args.dst} (GqlaForCausalLM, "
          f"d_c={args.kv_lora_rank}, d_R={args.qk_rope_head_dim}): KV cache per token and layer "
          f"{before} -> {after} elements absorbed ({100 * after / before:.2f} %)")
