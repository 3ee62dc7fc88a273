"""Checkpoint conversion to GQLA: ``gqla_compile.convert`` (TransGQLA for GQA/MHA models)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dims import is_latent_config
from ..errors import ConversionError
from .calibration import CalibrationInput
from .gqa import SUPPORTED_ARCHITECTURES, convert_gqa

__all__ = ["convert", "SUPPORTED_ARCHITECTURES"]


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
        num_groups: latent groups n_g; for a GQA source only num_key_value_heads (the default) is available.
        dtype: dtype of the returned model; None keeps the source's. The arithmetic is float64 regardless.
        progress: tqdm bars over calibration batches and layers.
        seed: seed of the default random calibration (and of the random-basis baseline).
        **kwargs: ``batch_size`` of calibration (8); ``_latent_basis`` "pca" (default) or "random" (a
            baseline for tests and benchmarks).

    Returns the new model in eval mode; ``config.conversion`` records how it was made.
    """
    if is_latent_config(model.config):
        raise ConversionError(
            f"{type(model).__name__} already has latent attention (kv_lora_rank={model.config.kv_lora_rank}); "
            "conversion of latent models to fewer groups (num_groups) is not available yet"
        )
    return convert_gqa(
        model, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim, calibration=calibration,
        tokenizer=tokenizer, num_groups=num_groups, dtype=dtype, progress=progress, seed=seed, **kwargs,
    )
