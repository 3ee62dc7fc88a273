"""Tiny built-in model configs: for the demo, the command line (``MODEL`` may name one) and the tests.

Each factory returns a transformers config with random-weight-sized dims small enough for a laptop CPU;
``overrides`` replace any field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
# DeepSeek configs default num_key_value_heads to 128; their eager attention repeats K/V by n_h // n_kv.
_MLA_HEADS = dict(num_key_value_heads=_COMMON["num_attention_heads"])


def tiny_llama(**overrides: Any):
    from transformers import LlamaConfig

    return LlamaConfig(**{**_COMMON, "num_key_value_heads": 2, "rope_theta": 10000.0, **overrides})


def tiny_qwen2(**overrides: Any):
    from transformers import Qwen2Config

    return Qwen2Config(**{**_COMMON, "num_key_value_heads": 2, **overrides})


def tiny_mistral(**overrides: Any):
    from transformers import MistralConfig

    return MistralConfig(**{**_COMMON, "num_key_value_heads": 2, "sliding_window": None, **overrides})


def tiny_deepseek_v2(**overrides: Any):
    from transformers import DeepseekV2Config

    moe_free = dict(first_k_dense_replace=_COMMON["num_hidden_layers"], n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=32, n_shared_experts=1)
    return DeepseekV2Config(**{**_COMMON, **_MLA, **_MLA_HEADS, **moe_free, "q_lora_rank": None, **overrides})


def tiny_deepseek_v3(**overrides: Any):
    from transformers import DeepseekV3Config

    moe_free = dict(first_k_dense_replace=_COMMON["num_hidden_layers"], n_routed_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1)
    return DeepseekV3Config(**{**_COMMON, **_MLA, **_MLA_HEADS, **moe_free, "q_lora_rank": None, "num_mtp_layers": 0, **overrides})


def tiny_gqla(**overrides: Any):
    from .configuration_gqla import GqlaConfig

    return GqlaConfig(**{**_COMMON, **_MLA, "num_key_value_heads": 2, **overrides})


TINY_CONFIGS: dict[str, Callable[..., Any]] = {
    "tiny-llama": tiny_llama,
    "tiny-qwen2": tiny_qwen2,
    "tiny-mistral": tiny_mistral,
    "tiny-deepseek-v2": tiny_deepseek_v2,
    "tiny-deepseek-v3": tiny_deepseek_v3,
    "tiny-gqla": tiny_gqla,
}
