"""Latent-attention dimensions read from a model config, and the names of the layouts a path can take.

The bottom of the package's imports: the paths (paths.py), the passes and the cost model read these, and this
module imports nothing of the package. The cache sizes the dims imply are the paths' (``cache_sizes.kv_cache_elements``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

#: How a path applies W_UV after attention: as a per-group batched matmul, or folded into o_proj.
OUTPUT_ABSORPTIONS: tuple[str, ...] = ("bmm", "folded")  # order breaks cost ties: the bmm keeps smaller weights
#: How a grouped cache holds the RoPE key: copied into each group's key (a stock GQA layout) or once, beside the
#: groups (n_g (d_n + d_v) + d_R per token). The plan picks one ("auto") or takes the one asked for.
ROPE_KEYS: tuple[str, ...] = ("copied", "shared")
#: How a path applies W_UK to the query. Folding it into q_proj is not implemented (the cost model does not price
#: what the rewrite cannot build), so this is the one choice.
QUERY_ABSORPTION = "bmm"


@dataclass(frozen=True)
class LatentDims:
    """Shapes of one latent-attention layer (DESIGN.md section 2 notation)."""

    n_h: int  # query heads
    n_g: int  # latent groups: KV heads on the grouped path (n_g = n_h for MLA)
    d_c: int  # latent rank (kv_lora_rank)
    d_R: int  # shared RoPE key dims (qk_rope_head_dim)
    d_n: int  # no-RoPE query/key dims per head (qk_nope_head_dim)
    d_v: int  # value dims per head (v_head_dim)
    hidden_size: int
    q_lora_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_h", "n_g", "d_c", "d_v", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LatentDims.{name} must be positive, got {getattr(self, name)}")
        for name in ("d_n", "d_R"):  # a block may have no RoPE dims (a NoPE layer) or only RoPE dims
            if getattr(self, name) < 0:
                raise ValueError(f"LatentDims.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_h % self.n_g:
            raise ValueError(f"{self.n_h} query heads do not split into {self.n_g} equal groups")

    @property
    def heads_per_group(self) -> int:
        return self.n_h // self.n_g

    @property
    def d_qk(self) -> int:
        """Head dim of the attention score: no-RoPE plus RoPE dims."""
        return self.d_n + self.d_R

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_config(self, num_layers: int) -> SimpleNamespace:
        """A GQLA-style config carrying these dims, for planning a model known only by its graph."""
        return SimpleNamespace(
            model_type="gqla",
            num_attention_heads=self.n_h,
            num_key_value_heads=self.n_g,
            kv_lora_rank=self.d_c,
            qk_rope_head_dim=self.d_R,
            qk_nope_head_dim=self.d_n,
            v_head_dim=self.d_v,
            hidden_size=self.hidden_size,
            q_lora_rank=self.q_lora_rank,
            num_hidden_layers=num_layers,
        )

    @classmethod
    def from_config(cls, config: Any) -> "LatentDims":
        """Read the dims of a GQLA or MLA (DeepSeek-style) config.

        MLA configs (every model type but "gqla") up-project the latent per head, so n_g = n_h whatever
        their ``num_key_value_heads`` says, unless the checkpoint was regrouped in its family by
        ``gqla_compile.convert`` (``gqla_conversion["num_groups"]`` records the groups its weights hold).
        """
        config = getattr(config, "get_text_config", lambda: config)()
        if not is_latent_config(config):
            raise ValueError(
                f"config of model_type {getattr(config, 'model_type', '?')!r} has no latent attention "
                "(no kv_lora_rank); convert it first with gqla_compile.convert"
            )
        n_h = config.num_attention_heads
        regrouped = getattr(config, "gqla_conversion", None) or {}
        n_g = config.num_key_value_heads if getattr(config, "model_type", None) == "gqla" else regrouped.get("num_groups", n_h)
        return cls(
            n_h=n_h,
            n_g=n_g,
            d_c=config.kv_lora_rank,
            d_R=config.qk_rope_head_dim,
            d_n=config.qk_nope_head_dim,
            d_v=config.v_head_dim,
            hidden_size=config.hidden_size,
            q_lora_rank=getattr(config, "q_lora_rank", None),
        )


def is_latent_config(config: Any) -> bool:
    """True for configs that describe latent attention (a kv_lora_rank and the DeepSeek head dims)."""
    return all(
        getattr(config, name, None) is not None
        for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    )
