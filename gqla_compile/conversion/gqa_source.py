"""The GQA source of TransGQLA: its attention shape, the checks of what the recipe covers, and its weights as
float64 "augmented" matrices ([out, D + 1], bias in the last column, so that biases ride along the algebra)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configuration_gqla import GqlaConfig
from ..errors import ConversionError
from .common import model_wide_config_fields

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "ATTENTION_PROJECTIONS", "GqaShape", "check_gqa_model", "check_ranks",
           "warn_sliding_window", "augmented_weight", "split_augmented", "gqla_config_for"]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
#: The source projections the conversion rebuilds (o_proj is kept, or refitted).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class GqaShape:
    """Attention shape of a GQA source model."""

    n_h: int  # query heads
    n_kv: int  # key/value heads (= latent groups n_g of the result)
    d_h: int  # head dim
    hidden_size: int

    @property
    def key_width(self) -> int:
        """n_kv * d_h: all key (or value) dims of one token."""
        return self.n_kv * self.d_h

    @property
    def n_freq(self) -> int:
        return self.d_h // 2

    @property
    def max_kv_lora_rank(self) -> int:
        """n_g (d_n + d_v) = 2 n_kv d_h: the width of the no-RoPE keys and values that the latent compresses."""
        return 2 * self.key_width

    def group_of_heads(self) -> torch.Tensor:
        """KV head (group) of every query head, as transformers' ``repeat_kv`` assigns them."""
        return torch.arange(self.n_h) // (self.n_h // self.n_kv)

    @classmethod
    def from_config(cls, config: Any) -> "GqaShape":
        n_h = config.num_attention_heads
        d_h = getattr(config, "head_dim", None) or config.hidden_size // n_h
        return cls(n_h=n_h, n_kv=getattr(config, "num_key_value_heads", None) or n_h, d_h=d_h,
                   hidden_size=config.hidden_size)


def check_gqa_model(model: nn.Module) -> GqaShape:
    """The source's attention shape; ConversionError for architectures the recipe does not cover."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"cannot convert {name}: TransGQLA supports {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(GQA/MHA attention with linear q/k/v projections and full rotary embedding)"
        )
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(
            f"{name} uses partial_rotary_factor={rope['partial_rotary_factor']}; TransGQLA needs RoPE on every head dim"
        )
    shape = GqaShape.from_config(config)
    if shape.d_h % 2:
        raise ConversionError(f"{name} has an odd head_dim ({shape.d_h}); RoPE needs pairs")
    return shape


def check_ranks(shape: GqaShape, kv_lora_rank: int, qk_rope_head_dim: int, num_groups: int | None) -> None:
    """ConversionError naming the value and its limit for ranks the source cannot give."""
    if num_groups is not None and num_groups != shape.n_kv:
        raise ConversionError(
            f"num_groups={num_groups}: a GQA source converts to n_g = num_key_value_heads = {shape.n_kv} groups; "
            "conversion to fewer groups is not available yet"
        )
    d_r = qk_rope_head_dim
    if not isinstance(d_r, int) or d_r <= 0 or d_r % 2 or d_r > shape.key_width:
        raise ConversionError(
            f"qk_rope_head_dim={d_r} is not possible: it must be a positive even number at most "
            f"num_key_value_heads * head_dim = {shape.n_kv} * {shape.d_h} = {shape.key_width}"
        )
    if not isinstance(kv_lora_rank, int) or kv_lora_rank <= 0 or kv_lora_rank > shape.max_kv_lora_rank:
        raise ConversionError(
            f"kv_lora_rank={kv_lora_rank} is not possible (d_c larger than possible): it must be positive and at most "
            f"n_g * (d_n + d_v) = {shape.n_kv} * ({shape.d_h} + {shape.d_h}) = {shape.max_kv_lora_rank}"
        )


def warn_sliding_window(config: Any) -> bool:
    """True (with a warning) when the source attends through a sliding window that GQLA does not have."""
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    if uses_window:
        logger.warning("source sliding_window=%s is dropped: the GQLA model attends to the full context "
                       "(identical for sequences up to the window)", window)
    return bool(uses_window)


def augmented_weight(linear: nn.Linear) -> torch.Tensor:
    """[out, in + 1] float64: the weight with the bias (or zeros) as the last column."""
    weight = linear.weight.detach().to(device="cpu", dtype=torch.float64)
    bias = linear.bias.detach().to(device="cpu", dtype=torch.float64) if linear.bias is not None else None
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias
    return torch.cat([weight, bias[:, None]], dim=1)


def split_augmented(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of an augmented matrix."""
    return matrix[:, :-1], matrix[:, -1]


def gqla_config_for(
    source_config: Any,
    *,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    rope_frequency_indices: list[int] | list[list[int]],
    attention_bias: bool = False,
    attention_output_bias: bool = False,
    conversion: dict | None = None,
) -> GqlaConfig:
    """The GqlaConfig of a GQA source converted with these ranks (needs no weights).

    ``rope_frequency_indices``: one list for all layers, or one per layer (stored as one shared list when the
    layers agree).
    """
    shape = GqaShape.from_config(source_config)
    tables = [list(table) for table in rope_frequency_indices] if rope_frequency_indices and isinstance(
        rope_frequency_indices[0], (list, tuple)) else [list(rope_frequency_indices)]
    shared = all(table == tables[0] for table in tables)
    return GqlaConfig(
        **model_wide_config_fields(source_config),
        hidden_size=shape.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_attention_heads=shape.n_h,
        num_key_value_heads=shape.n_kv,
        kv_lora_rank=kv_lora_rank,
        q_lora_rank=None,
        qk_rope_head_dim=qk_rope_head_dim,
        qk_nope_head_dim=shape.d_h,
        v_head_dim=shape.d_h,
        attention_bias=attention_bias,
        attention_output_bias=attention_output_bias,
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        kv_a_layernorm=False,
        softmax_scale=shape.d_h**-0.5,
        rope_frequency_dim=shape.d_h,
        rope_frequency_indices=tables[0] if shared else None,
        rope_layer_frequency_indices=None if shared else tables,
        conversion=conversion,
    )
