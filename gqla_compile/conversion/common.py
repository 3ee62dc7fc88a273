"""What every conversion that writes a GqlaForCausalLM shares (both TransGQLA directions): the config fields
copied from the source unchanged, and the model built from a complete state dict."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..configuration_gqla import GqlaConfig
from ..modeling_gqla import GqlaForCausalLM

_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def output_dtype(dtype: torch.dtype | str | None, source: nn.Module) -> torch.dtype:
    """The converted model's dtype: ``dtype`` (a torch dtype or its name), or the source's when None."""
    if dtype is None:
        return next(source.parameters()).dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def model_wide_config_fields(source_config: Any) -> dict[str, Any]:
    """GqlaConfig fields that describe the model around attention: vocabulary, depth, norms, tokens, RoPE."""
    rope = copy.deepcopy(dict(getattr(source_config, "rope_parameters", None) or _DEFAULT_ROPE))
    rope.pop("partial_rotary_factor", None)  # GQLA's rotary table is built from rope_frequency_dim instead
    return dict(
        vocab_size=source_config.vocab_size,
        num_hidden_layers=source_config.num_hidden_layers,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        initializer_range=getattr(source_config, "initializer_range", 0.02),
        rms_norm_eps=source_config.rms_norm_eps,
        pad_token_id=getattr(source_config, "pad_token_id", None),
        bos_token_id=getattr(source_config, "bos_token_id", None),
        eos_token_id=getattr(source_config, "eos_token_id", None),
        tie_word_embeddings=bool(getattr(source_config, "tie_word_embeddings", False)),
        rope_parameters=rope,
    )


def gqla_model_from_state(source: nn.Module, config: GqlaConfig, state: dict[str, torch.Tensor],
                          dtype: torch.dtype) -> nn.Module:
    """A GqlaForCausalLM of ``config`` holding ``state`` (every tensor it has, checked), copied to CPU in ``dtype``,
    with the source's generation config; in eval mode."""
    with no_init_weights():
        model = GqlaForCausalLM(config)
    model.load_state_dict({name: t.detach().to("cpu", dtype, copy=True) for name, t in state.items()},
                          strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = copy.deepcopy(source.generation_config)
    return model.eval()


def as_float64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A weight as the conversion's arithmetic takes it: detached, float64, on CPU (None stays None)."""
    return None if t is None else t.detach().to("cpu", torch.float64)
