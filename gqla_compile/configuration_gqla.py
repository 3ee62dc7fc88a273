"""Configuration of the GQLA model type (Group-Query Latent Attention), ``model_type = "gqla"``.

Field names follow transformers' ``DeepseekV3Config`` wherever they mean the same thing, so that code written
for MLA checkpoints (and the compiler's passes) reads GQLA checkpoints unchanged. MLA is the special case
``num_key_value_heads == num_attention_heads``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

__all__ = ["GqlaConfig"]


@strict
class GqlaConfig(PreTrainedConfig):
    r"""
    Configuration for [`GqlaModel`] / [`GqlaForCausalLM`]: a Llama-style decoder whose attention is GQLA.

    Each layer caches one latent ``c`` (``kv_lora_rank`` dims) and one shared RoPE key ``k_R``
    (``qk_rope_head_dim`` dims) per token; the key/value up-projections are indexed by *group*
    (``num_key_value_heads`` groups of ``num_attention_heads / num_key_value_heads`` query heads).

    Args:
        vocab_size (`int`, defaults to 32000): Vocabulary size.
        hidden_size (`int`, defaults to 4096): Model width D.
        intermediate_size (`int`, defaults to 11008): Width of the SwiGLU MLP.
        num_hidden_layers (`int`, defaults to 32): Number of decoder layers.
        num_attention_heads (`int`, defaults to 32): Query heads n_h.
        num_key_value_heads (`int`, *optional*): Latent groups n_g (the KV heads of the grouped-GQA decode path).
            Must divide `num_attention_heads`. `None` means n_g = n_h (plain MLA).
        kv_lora_rank (`int`, defaults to 512): Latent rank d_c.
        q_lora_rank (`int`, *optional*): Rank of the low-rank query (`q_a_proj` -> `q_a_layernorm` -> `q_b_proj`);
            `None` uses one plain `q_proj`.
        qk_rope_head_dim (`int`, defaults to 64): RoPE dims d_R of each query head and of the shared key; even.
        qk_nope_head_dim (`int`, defaults to 128): No-RoPE query/key dims d_n per head.
        v_head_dim (`int`, defaults to 128): Value dims d_v per head.
        hidden_act (`str`, defaults to `"silu"`): MLP activation.
        max_position_embeddings (`int`, defaults to 4096): Longest sequence the RoPE tables are meant for.
        initializer_range (`float`, defaults to 0.02): Std of the normal init of linear and embedding weights.
        rms_norm_eps (`float`, defaults to 1e-6): Epsilon of every RMSNorm.
        use_cache (`bool`, defaults to `True`): Whether forward returns the (latent) cache.
        pad_token_id / bos_token_id / eos_token_id: Special token ids.
        tie_word_embeddings (`bool`, defaults to `False`): Tie `lm_head` to `model.embed_tokens`.
        rope_parameters (`RopeParameters` or `dict`, *optional*): RoPE type and parameters, handled as in
            Llama / DeepSeek-V3 (`rope_theta` defaults to 10000; `rope_scaling` / `rope_theta` kwargs are accepted).
        attention_bias (`bool`, defaults to `False`): Bias on `q_proj` (or `q_a_proj`) and on
            `kv_a_proj_with_mqa` (a model converted from Qwen2 needs it).
        attention_output_bias (`bool`, defaults to `False`): Bias on `o_proj` (a converted Llama with
            `attention_bias=True` needs it).
        mlp_bias (`bool`, defaults to `False`): Bias on the MLP projections.
        attention_dropout (`float`, defaults to 0.0): Dropout on attention probabilities (training only).
        kv_a_layernorm (`bool`, defaults to `True`): Whether the latent is RMS-normalised (`kv_a_layernorm`
            module). Models converted from GQA use `False`: a norm would break the linearity the conversion needs.
        softmax_scale (`float`, *optional*): Score scale. `None` gives `(qk_nope_head_dim + qk_rope_head_dim)**-0.5`,
            times the yarn mscale squared when the rope parameters ask for it (as DeepSeek does). A converted model
            stores the original `head_dim**-0.5` here so that its logits stay unchanged.
        rope_frequency_dim (`int`, *optional*): Head dim used to build the rotary inverse-frequency table.
            `None` means `qk_rope_head_dim`. A converted model keeps the original model's head dim here.
        rope_frequency_indices (`list[int]`, *optional*): For each of the `qk_rope_head_dim // 2` RoPE pairs
            (pair p is dims (p, p + d_R/2), HF's rotate_half layout), the index of its frequency in that table.
            `None` means `range(qk_rope_head_dim // 2)`.
        rope_layer_frequency_indices (`list[list[int]]`, *optional*): One `rope_frequency_indices` list per layer,
            for checkpoints whose layers rotate their RoPE pairs at different frequencies (TransGQLA chooses the
            frequencies per layer). Replaces `rope_frequency_indices`, which must then be `None`.
        conversion (`dict`, *optional*): Free-form record of how a converted checkpoint was made (source model,
            method, calibration); never read by the model.

    Derived attributes (set in `__post_init__`, as DeepSeek-V3 does): `qk_head_dim = qk_nope_head_dim +
    qk_rope_head_dim` (also tells `generate` not to pre-size a static cache with equal K/V head dims) and
    `head_dim = qk_rope_head_dim`.
    """

    model_type = "gqla"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    base_model_tp_plan = {
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float | int = 0.0
    kv_a_layernorm: bool = True
    softmax_scale: float | None = None
    rope_frequency_dim: int | None = None
    rope_frequency_indices: list[int] | None = None
    rope_layer_frequency_indices: list[list[int]] | None = None
    conversion: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._check_latent_dims()
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.head_dim = self.qk_rope_head_dim
        super().__post_init__(**kwargs)

    def _check_latent_dims(self) -> None:
        """Raise a ValueError naming the field; done in __post_init__ so callers see a plain ValueError."""
        n_h, n_g = self.num_attention_heads, self.num_key_value_heads
        if n_g <= 0 or n_h % n_g != 0:
            raise ValueError(
                f"num_key_value_heads ({n_g}, the number of latent groups) must divide "
                f"num_attention_heads ({n_h})."
            )
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "qk_rope_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        d_r = self.qk_rope_head_dim
        if d_r % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {d_r}.")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank must be positive or None, got {self.q_lora_rank}.")
        freq_dim = self.qk_rope_head_dim if self.rope_frequency_dim is None else self.rope_frequency_dim
        if freq_dim <= 0 or freq_dim % 2:
            raise ValueError(f"rope_frequency_dim must be a positive even number, got {self.rope_frequency_dim}.")
        n_pairs, n_freqs = d_r // 2, freq_dim // 2
        if self.rope_layer_frequency_indices is not None:
            if self.rope_frequency_indices is not None:
                raise ValueError("give rope_frequency_indices (one list for all layers) or "
                                 "rope_layer_frequency_indices (one list per layer), not both.")
            tables = list(self.rope_layer_frequency_indices)
            if len(tables) != self.num_hidden_layers:
                raise ValueError(f"rope_layer_frequency_indices must have one list per layer "
                                 f"(num_hidden_layers = {self.num_hidden_layers}), got {len(tables)}.")
            for table in tables:
                self._check_frequency_indices(table, n_pairs, n_freqs, "rope_layer_frequency_indices")
            return
        if self.rope_frequency_indices is None:
            if n_freqs < n_pairs:
                raise ValueError(
                    f"rope_frequency_dim ({freq_dim}) is smaller than qk_rope_head_dim ({d_r}); "
                    "give rope_frequency_indices to say which frequencies the RoPE pairs use."
                )
            return
        self._check_frequency_indices(self.rope_frequency_indices, n_pairs, n_freqs, "rope_frequency_indices")

    @staticmethod
    def _check_frequency_indices(indices: list[int], n_pairs: int, n_freqs: int, field: str) -> None:
        indices = list(indices)
        if len(indices) != n_pairs:
            raise ValueError(f"{field} must have qk_rope_head_dim // 2 = {n_pairs} entries per table, got {len(indices)}.")
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_freqs]
        if bad:
            raise ValueError(
                f"{field} entries must be ints in [0, rope_frequency_dim // 2 = {n_freqs}), got {bad}."
            )

    def layer_frequency_indices(self, layer_idx: int) -> list[int]:
        """The RoPE frequency index of each pair in layer ``layer_idx`` (into the rope_frequency_dim table)."""
        if self.rope_layer_frequency_indices is not None:
            return list(self.rope_layer_frequency_indices[layer_idx])
        if self.rope_frequency_indices is not None:
            return list(self.rope_frequency_indices)
        return list(range(self.qk_rope_head_dim // 2))
