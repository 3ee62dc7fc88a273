"""GQLA's rotary table and softmax scale: a selection of another model's RoPE frequencies (TransGQLA keeps the
source's), built with transformers' own rope init functions, and DeepSeek's default softmax scale.

Kept apart from modeling_gqla.py (the model itself) because converters and the serving side build the same
table without the model: ``compute_gqla_inv_freq`` is the one place it is computed.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .configuration_gqla import GqlaConfig

logger = logging.getLogger(__name__)

__all__ = ["GqlaRotaryEmbedding", "compute_gqla_inv_freq", "default_softmax_scale", "rope_config_view"]

# RoPE types whose tables transformers recomputes during forward (``dynamic_rope_update``); not supported
# together with a frequency selection, so the table computed at init is used for every length.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")



def rope_config_view(config: GqlaConfig) -> GqlaConfig:
    """A shallow copy of ``config`` whose head dim is the rotary table's dim (``rope_frequency_dim``).

    transformers' rope init functions derive the table size from ``config.head_dim`` (times
    ``partial_rotary_factor``); a converted model keeps the *original* head dim and rope parameters, so the
    table is built on this view and then index-selected.
    """
    view = copy.copy(config)
    params = dict(config.rope_parameters or {})
    params.pop("partial_rotary_factor", None)
    view.rope_parameters = params
    view.head_dim = config.rope_frequency_dim or config.qk_rope_head_dim
    return view


def compute_gqla_inv_freq(
    config: GqlaConfig, device: torch.device | str | None = None, frequency_indices: list[int] | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the d_R/2 RoPE pairs and the cos/sin scaling, for ``config``.

    The full table comes from transformers' own rope init (default or ``ROPE_INIT_FUNCTIONS[rope_type]``) with
    head dim ``rope_frequency_dim``; pair p then takes entry ``frequency_indices[p]`` of it (default: the
    config's ``rope_frequency_indices``).
    """
    view = rope_config_view(config)
    rope_type = view.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        rope_init_fn: Callable = LlamaRotaryEmbedding.compute_default_rope_parameters
    else:
        rope_init_fn = ROPE_INIT_FUNCTIONS[rope_type]
    full_inv_freq, attention_scaling = rope_init_fn(view, device=device)
    indices = config.layer_frequency_indices(0) if frequency_indices is None else frequency_indices
    index = torch.tensor(indices, dtype=torch.long, device=full_inv_freq.device)
    return full_inv_freq.index_select(0, index).contiguous(), attention_scaling


class GqlaRotaryEmbedding(nn.Module):
    """Rotary table of the d_R RoPE dims, possibly a selection of another model's frequencies.

    ``frequency_indices`` (default: the config's shared selection) picks the table's frequencies; a model whose
    layers use different selections holds one such module per distinct selection. cos/sin are built exactly as HF does (``emb = cat(freqs, freqs)``, times ``attention_scaling``), so they
    feed ``apply_rotary_pos_emb`` (rotate_half layout: pair p is dims (p, p + d_R/2)).
    """

    inv_freq: torch.Tensor

    def __init__(
        self, config: GqlaConfig, device: torch.device | str | None = None, frequency_indices: list[int] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.frequency_indices = config.layer_frequency_indices(0) if frequency_indices is None else list(frequency_indices)
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type in _DYNAMIC_ROPE_TYPES:
            logger.warning(
                "GQLA: rope_type %r recomputes its table with the sequence length in transformers; this model "
                "uses the table computed at init for every length.",
                self.rope_type,
            )
        inv_freq, self.attention_scaling = compute_gqla_inv_freq(config, device, self.frequency_indices)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def default_softmax_scale(config: GqlaConfig) -> float:
    """``config.softmax_scale`` or DeepSeek's default: (d_n + d_R)^-0.5, times the yarn mscale^2 if asked."""
    if config.softmax_scale is not None:
        return float(config.softmax_scale)
    scaling = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = config.rope_parameters or {}
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if mscale_all_dim:
            mscale = _yarn_get_mscale(params["factor"], mscale_all_dim)
            scaling = scaling * mscale * mscale
    return scaling
