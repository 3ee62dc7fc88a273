"""What every conversion copies from the source config unchanged (both TransGQLA directions)."""

from __future__ import annotations

import copy
from typing import Any

_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


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
