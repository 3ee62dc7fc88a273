"""The GQLA model type (Group-Query Latent Attention): ``GqlaModel`` and ``GqlaForCausalLM``, Hugging Face style.

Built like transformers' own Llama and DeepSeek-V3 (dense MLP, no MoE, no MTP), reusing their helpers
(attention interface registry, rotary init functions, masks, caches, generation). The attention is the plain
"training" form: it caches the latent exactly as transformers' DeepSeek-V3 does (one-head "key" = latent c,
one-head "value" = RoPE key k_R) and re-expands keys and values per *group* at every step. The compiler
rewrites it into the absorbed-MQA or grouped-GQA decode path; this module is the reference it must match.

Weight layout (per layer, other code relies on it):

- ``self_attn.q_proj`` [n_h*(d_n+d_R), D], or ``q_a_proj`` [q_lora, D] + ``q_a_layernorm`` + ``q_b_proj``;
  per head: d_n no-RoPE rows, then d_R RoPE rows.
- ``self_attn.kv_a_proj_with_mqa`` [d_c + d_R, D]: latent rows, then the shared RoPE key rows.
- ``self_attn.kv_a_layernorm`` RMSNorm(d_c), only when ``config.kv_a_layernorm``.
- ``self_attn.kv_b_proj`` [n_g*(d_n+d_v), d_c], no bias; per group: d_n key rows, then d_v value rows.
- ``self_attn.o_proj`` [D, n_h*d_v]. Head h uses group h // (n_h / n_g).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .compat import CACHE_FIELD, cache_keyword, slice_logits_to_keep
from .configuration_gqla import GqlaConfig
# compute_gqla_inv_freq: re-exported for the serving side, which imports the model's helpers from here
from .rope_gqla import GqlaRotaryEmbedding, compute_gqla_inv_freq, default_softmax_scale  # noqa: F401

logger = logging.getLogger(__name__)

__all__ = [
    "GqlaAttention",
    "GqlaDecoderLayer",
    "GqlaForCausalLM",
    "GqlaMLP",
    "GqlaModel",
    "GqlaPreTrainedModel",
    "GqlaRMSNorm",
    "GqlaRotaryEmbedding",
    "register_auto_classes",
]


class GqlaRMSNorm(nn.Module):
    """RMSNorm computed in float32, as Llama / DeepSeek-V3 do (so converted weights behave identically)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class GqlaMLP(nn.Module):
    """Llama's SwiGLU MLP (``down(act(gate(x)) * up(x))``)."""

    def __init__(self, config: GqlaConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GqlaAttention(nn.Module):
    """Group-Query Latent Attention, plain form: cache the latent, expand K/V per group, attend as GQA.

    Same calling convention as ``DeepseekV3Attention``: ``forward(hidden_states, position_embeddings,
    attention_mask, cache=None, **kwargs) -> (attn_output, attn_weights)``. With no cache the forward has no
    data-dependent Python control flow, so ``torch.export`` captures it with dynamic batch and length.
    """

    def __init__(self, config: GqlaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attention_dropout = config.attention_dropout
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_groups  # query heads per group (GQA broadcast)
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.is_causal = True
        self.scaling = default_softmax_scale(config)

        q_out = self.num_heads * self.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(self.hidden_size, q_out, bias=config.attention_bias)
        else:
            self.q_a_proj = nn.Linear(self.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = GqlaRMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, q_out, bias=False)

        self.kv_a_proj_with_mqa = nn.Linear(
            self.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = (
            GqlaRMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps) if config.kv_a_layernorm else None
        )
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_groups * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.v_head_dim, self.hidden_size, bias=config.attention_output_bias
        )

    def project_query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Queries [B, n_h, T, d_n + d_R] (before RoPE)."""
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        batch_size, seq_length = hidden_states.shape[:-1]
        return q.view(batch_size, seq_length, -1, self.qk_head_dim).transpose(1, 2)

    def expand_kv(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group keys [B, n_g, S, d_n + d_R] and values [B, n_g, S, d_v] from the latent [B, 1, S, d_c]
        and the shared RoPE key [B, 1, S, d_R] (broadcast into every group)."""
        batch_size, _, seq_length, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch_size, seq_length, self.num_groups, -1).transpose(1, 2)
        k_nope, value_states = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope.expand(-1, self.num_groups, -1, -1)
        key_states = torch.cat((k_nope, k_rope), dim=-1)
        return key_states, value_states

    @cache_keyword
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_length = hidden_states.shape[:-1]

        q_states = self.project_query(hidden_states)
        q_nope, q_rope = torch.split(q_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
        latent, k_rope = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.kv_a_layernorm is not None:
            latent = self.kv_a_layernorm(latent)
        # One-head 4-D tensors, so every transformers cache layer stores them (key dim d_c, value dim d_R).
        latent = latent.view(batch_size, 1, seq_length, self.kv_lora_rank)
        k_rope = k_rope.view(batch_size, 1, seq_length, self.qk_rope_head_dim)

        cos, sin = position_embeddings
        q_rope, k_rope = apply_rotary_pos_emb(q_rope, k_rope, cos, sin)

        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx, kwargs=kwargs)

        query_states = torch.cat((q_nope, q_rope), dim=-1)
        key_states, value_states = self.expand_kv(latent, k_rope)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class GqlaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: GQLA attention then SwiGLU MLP, each with a residual."""

    def __init__(self, config: GqlaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = GqlaAttention(config=config, layer_idx=layer_idx)
        self.mlp = GqlaMLP(config)
        self.input_layernorm = GqlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GqlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @cache_keyword
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class GqlaPreTrainedModel(PreTrainedModel):
    """Shared weight init, capability flags and output capture of the GQLA models."""

    config: GqlaConfig
    config_class = GqlaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GqlaDecoderLayer"]
    _supports_sdpa = True
    # Flash-attention kernels want equal K/V head dims (d_n + d_R vs d_v) and are untested here.
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": GqlaDecoderLayer,
        "attentions": GqlaAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """normal(0, initializer_range) for linears/embeddings, ones for norms (transformers' defaults); the
        rotary buffers are recomputed with the frequency selection (the generic rule would rebuild a full table)."""
        if isinstance(module, GqlaRotaryEmbedding):
            inv_freq, _ = compute_gqla_inv_freq(module.config, module.inv_freq.device, module.frequency_indices)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
            return
        super()._init_weights(module)


class GqlaModel(GqlaPreTrainedModel):
    """The decoder stack: embeddings, GQLA layers, final norm (no LM head)."""

    def __init__(self, config: GqlaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GqlaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = GqlaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # One rotary module per distinct frequency selection; layer i reads table layer_rotary_table[i].
        tables = [tuple(config.layer_frequency_indices(i)) for i in range(config.num_hidden_layers)]
        distinct = list(dict.fromkeys(tables))
        self.rotary_emb = GqlaRotaryEmbedding(config=config, frequency_indices=list(distinct[0]))
        self.layer_rotary_embs = nn.ModuleList(
            [GqlaRotaryEmbedding(config=config, frequency_indices=list(table)) for table in distinct[1:]]
        )
        self.layer_rotary_table = [distinct.index(table) for table in tables]
        self.gradient_checkpointing = False
        self.post_init()

    @cache_keyword
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        """Run the decoder; the cache (a DynamicCache if none is given and ``use_cache``) holds latents."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # The cache goes by position: its keyword is ``past_key_values`` before transformers 5.20.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)

        hidden_states = inputs_embeds
        position_embeddings = [rotary(hidden_states, position_ids=position_ids)
                               for rotary in (self.rotary_emb, *self.layer_rotary_embs)]

        for decoder_layer, table in zip(self.layers[: self.config.num_hidden_layers], self.layer_rotary_table):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings[table],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


class GqlaForCausalLM(GqlaPreTrainedModel, GenerationMixin):
    """GQLA decoder with a language-model head; ``generate`` works with DynamicCache and StaticCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: GqlaConfig) -> None:
        super().__init__(config)
        self.model = GqlaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @cache_keyword
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """Logits (only the last ``logits_to_keep`` positions if non-zero) and, with ``labels``, the LM loss."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def register_auto_classes() -> None:
    """Register ``model_type "gqla"`` with AutoConfig / AutoModel / AutoModelForCausalLM; safe to call twice."""
    for register, args in (
        (AutoConfig.register, ("gqla", GqlaConfig)),
        (AutoModel.register, (GqlaConfig, GqlaModel)),
        (AutoModelForCausalLM.register, (GqlaConfig, GqlaForCausalLM)),
    ):
        try:
            register(*args, exist_ok=True)
        except TypeError:  # an older signature without ``exist_ok``
            try:
                register(*args)
            except ValueError:
                logger.debug("GQLA: %s already registered", args[0])


register_auto_classes()
