"""Cached elements per token and layer of a model config on a decoding path, and of the model as it is
("original": what transformers' own MLA models cache, or a plain GQA/MHA model's keys and values): one place for
DESIGN.md section 2's cache table, read by the converters, the commands, the report and the benchmarks. The
layouts themselves are the paths' (``DecodePath.cache_elements``).
"""

from __future__ import annotations

from typing import Any

from .dims import LatentDims, is_latent_config
from .paths import PATHS


def latent_cache_elements(dims: LatentDims, path: str, *, rope_key: str = "copied") -> int:
    """Cached elements per token and layer for one path of a latent-attention layer (paths.py owns the layouts).

    "original" is what transformers' own MLA models cache (the latent and the RoPE key, re-expanded at every
    step): the same elements as the absorbed path.
    """
    if path == "original":
        return dims.d_c + dims.d_R
    if path not in PATHS:
        raise ValueError(f"unknown cache path {path!r}; known: {', '.join([*PATHS, 'original'])}")
    return PATHS[path].cache_elements(dims, rope_key=rope_key)


def kv_cache_elements(config: Any, path: str = "original", *, rope_key: str = "copied") -> int:
    """Cached elements per token and layer for a model config and a decoding path.

    Latent configs (GQLA, MLA) accept "absorbed", "grouped" and "original"; plain GQA/MHA configs
    (Llama, Qwen2, Mistral, ...) only "original": 2 * num_key_value_heads * head_dim.
    """
    config = getattr(config, "get_text_config", lambda: config)()
    if is_latent_config(config):
        return latent_cache_elements(LatentDims.from_config(config), path, rope_key=rope_key)
    if path != "original":
        raise ValueError(
            f"a {getattr(config, 'model_type', 'non-latent')} config has no {path!r} path: it has no latent "
            "attention. Convert it with gqla_compile.convert first, or ask for path='original'"
        )
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * n_kv * head_dim
