"""``gqla-compile export``: a GQLA checkpoint folder as a checkpoint of a stock family (DeepSeek-V3) for serving.

Exit codes (cli.py): 2 for a missing source, an existing destination without ``--force`` and a model the
format cannot express (nothing is written then); 1 for other failures.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..exporting import FORMATS

    parser = subparsers.add_parser(
        "export",
        help="write a GQLA checkpoint as a DeepSeek-V3 checkpoint that stock transformers and serving engines load",
        description="Write a GqlaForCausalLM checkpoint (e.g. a TransGQLA result) as a DeepSeek-V3 checkpoint: each "
        "group's kv_b_proj block repeated for its heads, the softmax scale folded into the queries, RoPE pairs "
        "in DeepSeek-V3's interleaved layout, the latent padded to the 512 + 64 that MLA kernels (FlashMLA, vLLM) take "
        "when it is another size (exact; the cache it costs is printed as a warning). Refuses what the format cannot "
        "express exactly (no latent norm with rms_norm_eps other than 1e-6, MLP biases, a RoPE frequency subset no "
        "DeepSeek-V3 table holds); warns on attention biases.",
    )
    parser.add_argument("src", metavar="SRC_DIR", help="GQLA model folder (safetensors), or a tiny config name")
    parser.add_argument("dst", metavar="DST_DIR", help="output folder (must not exist unless --force)")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="checkpoint family (default %(default)s)")
    parser.add_argument("--pad-latent", action=argparse.BooleanOptionalAction, default=None,
                        help="pad the latent to 512 + 64 for MLA kernels (refusing what cannot be), or keep GQLA's "
                        "sizes (--no-pad-latent); default: pad when the latent is another size and can be padded")
    parser.add_argument("--force", action="store_true", help="replace DST_DIR if it exists (only once complete)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..checkpoint import ModelNotFoundError, check_output_free, load_config, load_model
    from ..cli import UsageError
    from ..errors import ConversionError
    from ..exporting import export

    try:
        check_output_free(args.dst, force=args.force)
        source = load_model(args.src)
        out = export(source, args.dst, format=args.format, pad_latent=args.pad_latent, force=args.force)
    except (FileExistsError, ModelNotFoundError, ConversionError) as exc:
        raise UsageError(str(exc)) from exc
    config = source.config
    written = load_config(out)
    print(f"exported {args.src} ({type(source).__name__}, {config.num_key_value_heads} groups of "
          f"{config.num_attention_heads // config.num_key_value_heads} heads, latent {config.kv_lora_rank} + "
          f"{config.qk_rope_head_dim}) -> {out} ({args.format}, latent {written.kv_lora_rank} + "
          f"{written.qk_rope_head_dim})")
