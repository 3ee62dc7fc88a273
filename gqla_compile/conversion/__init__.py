"""Checkpoint conversion to GQLA: ``gqla_compile.convert`` (TransGQLA for GQA/MHA models)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dims import is_latent_config
from ..errors import ConversionError
from .calibration import DEFAULT_BATCH_SIZE, Calibration, CalibrationInput
from .gqa import SUPPORTED_ARCHITECTURES, convert_gqa
from .mla import convert_mla

__all__ = ["convert", "SUPPORTED_ARCHITECTURES"]

# convert() keywords that only the GQA converter takes, and those that only the latent converter takes
GQA_OPTIONS = ("rope_band_size", "rope_allocation", "sequential", "fit_output", "fit_steps", "fit_lr", "balance")
LATENT_OPTIONS = ("grouping", "weighting", "score_aware", "output")


def convert(
    model: nn.Module,
    *,
    kv_lora_rank: int = 512,
    qk_rope_head_dim: int = 64,
    calibration: CalibrationInput = None,
    tokenizer: Any = None,
    num_groups: int | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Convert a pretrained GQA/MHA causal LM (Llama, Qwen2, Mistral) into a ``GqlaForCausalLM`` (TransGQLA).

    Args:
        model: the source model; it is only read (run on the calibration data), never changed.
        kv_lora_rank: latent rank d_c, at most 2 * num_key_value_heads * head_dim (then lossless apart from RoPE).
        qk_rope_head_dim: shared RoPE key dims d_R, even, at most num_key_value_heads * head_dim (then the
            conversion is exact at full kv_lora_rank).
        calibration: token-id sequences (tensors or lists), or strings with ``tokenizer``; None uses 64
            sequences of 128 random token ids (seeded) and warns: quality needs real text.
        num_groups: latent groups n_g; for a GQA source only num_key_value_heads (the default) is available. For a
            latent-attention source (MLA, GQLA; found by the compiler's detector) any divisor of the query heads
            (default: as many as heads, exact); kv_lora_rank and qk_rope_head_dim are then the source's own.
        dtype: dtype of the returned model; None keeps the source's. The arithmetic is float64 regardless.
        progress: tqdm bars over calibration batches and layers.
        seed: seed of the default random calibration (and of the random-basis baseline).
        **kwargs: for GQA sources: ``rope_band_size`` ("auto": per-layer FreqFold band chosen on calibration
            data, 1 at qk_rope_head_dim = n_kv * head_dim, where that is exact; or a power of two for every layer),
            ``rope_allocation`` ("freqfold", or "energy": one ranking of pairs by key energy for all layers, a
            baseline),
            ``balance`` ("auto": per layer, the key/value weighting of the joint PCA whose attention output is
            closest to the source's on calibration data, of the RMS-norm ratio and half and twice it; "rms": that
            ratio), ``sequential`` (True: layer i is calibrated on the outputs of the already converted layers),
            ``fit_output`` (True: least-squares o_proj against the source attention's output), ``fit_steps`` (0)
            and ``fit_lr`` (1e-4): Adam refinement steps of each layer's attention weights (see
            ``conversion/gqa.py``). ``batch_size`` of calibration (8); for latent models ``grouping`` ("neighbour" or
            "similarity"), ``weighting`` (None or "loss"), ``score_aware`` and ``output`` ("family": the
            source's own class regrouped in place, the default; "gqla": a GqlaForCausalLM where that is exact)
            (see ``conversion/mla.py``);
            ``_latent_basis`` "pca" (default) or "random" (a
            baseline for tests and benchmarks).

    Returns the new model in eval mode; ``config.conversion`` (``config.gqla_conversion`` for a latent source
    kept in its family) records how it was made.
    """
    run = Calibration(calibration, tokenizer, seed=seed, batch_size=kwargs.pop("batch_size", DEFAULT_BATCH_SIZE),
                      progress=progress)
    latent_options = {name: kwargs.pop(name) for name in LATENT_OPTIONS if name in kwargs}
    if _goes_to_the_latent_converter(model, num_groups, latent_options):
        gqa_only = sorted(set(kwargs) & set(GQA_OPTIONS))
        if gqa_only:
            raise ConversionError(f"{', '.join(gqa_only)} apply to GQA sources only (TransGQLA), not to regrouping a "
                                  "latent-attention model")
        return convert_mla(model, run, num_groups=num_groups, dtype=dtype, **latent_options, **kwargs)
    return convert_gqa(model, run, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                       num_groups=num_groups, dtype=dtype, **kwargs)


def _goes_to_the_latent_converter(model: nn.Module, num_groups: int | None, latent_options: dict[str, Any]) -> bool:
    """Latent models (MLA, GQLA), and any model asked for the latent options or for other groups than its GQA
    key-value heads, go to the latent converter, whose detector decides (and says so when the model holds no
    latent attention)."""
    config = getattr(model, "config", None)
    gqa_groups = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    wants_latent = any(v not in (None, False) for v in latent_options.values()) or (
        num_groups is not None and num_groups != gqa_groups)
    return config is None or is_latent_config(config) or wants_latent
