"""vLLM models for GQLA checkpoints, loaded by vLLM's registry by name (``plugin.ARCHITECTURES``).

- ``GqlaForCausalLM``: TransGQLA results (model_type "gqla"): a Llama-style decoder (vLLM's RMSNorm,
  LlamaMLP, vocab-parallel embedding, ParallelLMHead, LogitsProcessor) with ``GqlaServingAttention``.
- ``GqlaDeepseekV2ForCausalLM`` / ``GqlaDeepseekV3ForCausalLM``: vLLM's own DeepSeek classes, unchanged
  unless the config's ``gqla_conversion`` says the checkpoint was regrouped into fewer groups than heads;
  then each layer's attention is a ``GqlaServingAttention`` and the rest (MoE, norms, loading) stays vLLM's.

The decoding path is chosen once per model at load time (``selection.choose_path``) and logged in one line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models import deepseek_v2
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.selector import get_attn_backend

from .. import targets
from ..dims import LatentDims
from ..modeling_gqla import compute_gqla_inv_freq, default_softmax_scale
from ..paths import PATHS, DecodePath
from . import backend_costs
from .attention import AttentionSpec, GqlaServingAttention, LatentPadding
from .selection import SERVED_RECORD, EngineShape, GqlaServingError, choose_path, is_regrouped

logger = logging.getLogger(__name__)

# vLLM's CPU MLA kernel and FlashMLA are built for DeepSeek's latent: 512 latent + 64 RoPE-key dims.
_MLA_LATENT, _MLA_ROPE = 512, 64


@dataclass(frozen=True)
class ServingPlan:
    """The load-time decision for one model: path, and the sizes its backend serves it at."""

    path: str
    padding: LatentPadding | None  # MLA layouts: the served latent and RoPE key
    head_size: int | None  # the cached head size the backend serves (padded where it takes only some sizes)


@dataclass(frozen=True)
class _Served:
    """One path's layout as this platform's attention backend would serve it."""

    backend: str
    head_size: int | None  # None: the backend cannot serve it (``problem`` says why)
    padding: LatentPadding | None = None  # MLA layouts
    problem: str | None = None


def _engine_shape(vllm_config: VllmConfig, target: Any) -> EngineShape:
    spec = vllm_config.speculative_config
    return EngineShape(
        tp=vllm_config.parallel_config.tensor_parallel_size,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        tokens_per_step=1 + (spec.num_speculative_tokens if spec is not None else 0),
        max_model_len=vllm_config.model_config.max_model_len,
        dtype=vllm_config.model_config.dtype,
        target=target,
    )


def _engine_target(backends: dict[str, str], padding: dict[str, float]) -> tuple[Any, str]:
    """The target of this platform (``targets.resolve("auto")``) with its attention kernels priced as the vLLM
    backends each path runs on measured, and as padded (``backend_costs``); and what was applied."""
    return backend_costs.engine_target(targets.resolve("auto"), current_platform.device_type, backends, padding)


def _backend_sizes(vllm_config: VllmConfig, head_size: int, use_mla: bool) -> tuple[str, list[int]]:
    """The backend vLLM picks on this platform for such a layer, and the head sizes it supports ([] = any)."""
    with set_current_vllm_config(vllm_config):  # also called at engine set-up, outside vLLM's own context
        backend = get_attn_backend(head_size, vllm_config.model_config.dtype, vllm_config.cache_config.cache_dtype,
                                   use_mla=use_mla)
    return backend.get_name(), list(backend.get_supported_head_sizes())


def _served_mla(dims: LatentDims, vllm_config: VllmConfig) -> _Served:
    """The latent as the MLA backend takes it: as is, else zero-padded to 512 + 64 where the kernel is built
    for that size only."""
    need = dims.d_c + dims.d_R
    name, sizes = _backend_sizes(vllm_config, _MLA_LATENT + _MLA_ROPE, use_mla=True)
    if not sizes or need in sizes:
        return _Served(name, need, LatentPadding(dims.d_c, dims.d_R))
    if _MLA_LATENT + _MLA_ROPE in sizes and dims.d_c <= _MLA_LATENT and dims.d_R <= _MLA_ROPE:
        return _Served(name, _MLA_LATENT + _MLA_ROPE, LatentPadding(_MLA_LATENT, _MLA_ROPE))
    return _Served(name, None, problem=(
        f"vLLM's {name} MLA backend takes latent + RoPE-key sizes {sizes}, not {dims.d_c} + {dims.d_R}; "
        f"export the model with a latent of at most {_MLA_LATENT} + {_MLA_ROPE}"))


def _served_gqa(need: int, dims: LatentDims, vllm_config: VllmConfig) -> _Served:
    """KV heads of ``need`` dims as the attention backend takes them: the smallest supported size that fits."""
    name, sizes = _backend_sizes(vllm_config, need, use_mla=False)
    fitting = [s for s in sorted(sizes) if s >= need]
    if not sizes:
        return _Served(name, need)
    if fitting:
        return _Served(name, fitting[0])
    return _Served(name, None, problem=(
        f"vLLM's {name} attention backend takes head sizes up to {max(sizes)}, this layout needs {need} "
        f"(d_n + d_R = {dims.d_n + dims.d_R}, d_v = {dims.d_v})"))


def _served(path: DecodePath, dims: LatentDims, vllm_config: VllmConfig) -> _Served:
    layout = path.serving_layout(dims)
    return _served_mla(dims, vllm_config) if layout.mla else _served_gqa(layout.head_size, dims, vllm_config)


def _kernel_work(path: DecodePath, dims: LatentDims, served: _Served) -> float:
    """The attention kernel's work over the model's: a GQA layout pads its keys and values only inside the
    kernel (its projections keep the model's sizes); an MLA layout's padded latent also widens its
    projections, so it is priced through the served sizes instead (1 here)."""
    if path.serving_layout(dims).mla or served.head_size is None:
        return 1.0
    return 2 * served.head_size / path.attention_head_dims(dims)


def _padding_note(path: DecodePath, dims: LatentDims, served: _Served) -> str:
    """What the backend's padding costs, for the log line ("" when it pads nothing)."""
    layout = path.serving_layout(dims)
    if served.head_size == layout.head_size and (layout.mla or 2 * layout.head_size == path.attention_head_dims(dims)):
        return ""
    if layout.mla:
        return (f"; latent zero-padded from {dims.d_c} + {dims.d_R} to {served.padding.d_c} + {served.padding.d_R} "
                f"for the MLA backend: {served.head_size / layout.head_size:.2f}x the cache bytes and attention "
                "reads per token")
    return (f"; query/key/value heads zero-padded to {served.head_size} (keys {dims.d_n + dims.d_R}, values "
            f"{dims.d_v}) for the attention backend: {_kernel_work(path, dims, served):.2f}x the cache bytes and "
            "attention reads per token")


def recorded_plan(config: Any) -> ServingPlan | None:
    """The plan ``config_hooks`` recorded on the config at engine set-up (it reaches every worker)."""
    record = getattr(config, SERVED_RECORD, None)
    if not record:
        return None
    padding = LatentPadding(**record["padding"]) if record["padding"] else None
    return ServingPlan(record["path"], padding, record["head_size"])


def serving_plan(config: Any, vllm_config: VllmConfig, *, log: bool = True) -> ServingPlan:
    """Choose the path for ``config`` on this engine and platform, with its padding; log it when ``log``."""
    dims = LatentDims.from_config(config)
    served = {name: _served(path, dims, vllm_config) for name, path in PATHS.items()}
    target, pricing = _engine_target({name: s.backend for name, s in served.items()},
                                     {name: _kernel_work(PATHS[name], dims, s) for name, s in served.items()})
    served_sizes = {name: {"kv_lora_rank": s.padding.d_c, "qk_rope_head_dim": s.padding.d_R}
                    for name, s in served.items() if s.padding is not None}
    shape = _engine_shape(vllm_config, target)
    if shape.tokens_per_step > 1:  # the table measures one-token decode kernels (docs/serving.md, Limits)
        pricing += (f"; at {shape.tokens_per_step} tokens per step the attention is priced by the target's "
                    "multi-token kernels, not measured in vLLM")
    choice = choose_path(config, shape, {name: s.problem for name, s in served.items()}, served_sizes)
    chosen = served[choice.path]
    if log:
        logger.info("GQLA: serving %s (n_h=%d, n_g=%d, d_c=%d, d_R=%d) on the %s path: %s%s; %s",
                    getattr(config, "model_type", "?"), dims.n_h, dims.n_g, dims.d_c, dims.d_R, choice.path,
                    choice.reason, _padding_note(PATHS[choice.path], dims, chosen), pricing)
    return ServingPlan(choice.path, chosen.padding, chosen.head_size)


def _plan_of(config: Any, vllm_config: VllmConfig) -> ServingPlan:
    """The plan recorded at engine set-up, else (a model built outside vLLM's engine) decided here."""
    return recorded_plan(config) or serving_plan(config, vllm_config, log=get_tensor_model_parallel_rank() == 0)


def _attention(spec: AttentionSpec, plan: ServingPlan, rope_table: torch.Tensor, vllm_config: VllmConfig,
               prefix: str) -> GqlaServingAttention:
    return GqlaServingAttention(spec, plan.path, rope_table, padding=plan.padding, head_size=plan.head_size,
                                cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                                prefix=prefix)


# ---- TransGQLA checkpoints (model_type "gqla")

def _gqla_rope_table(config: Any, layer: int, positions: int) -> torch.Tensor:
    """cos|sin of layer ``layer``'s RoPE pairs, built exactly as ``modeling_gqla.GqlaRotaryEmbedding`` does."""
    inv_freq, scaling = compute_gqla_inv_freq(config, "cpu", config.layer_frequency_indices(layer))
    freqs = torch.arange(positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)


def _gqla_spec(config: Any) -> AttentionSpec:
    return AttentionSpec(dims=LatentDims.from_config(config), scale=default_softmax_scale(config),
                         eps=config.rms_norm_eps, latent_norm=config.kv_a_layernorm, qkv_bias=config.attention_bias,
                         o_bias=config.attention_output_bias, rope_neox=True)


class GqlaDecoderLayer(nn.Module):
    """Pre-norm decoder layer: GQLA attention, then Llama's SwiGLU MLP (vLLM's fused residual norms)."""

    def __init__(self, config: Any, attention: GqlaServingAttention, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=vllm_config.quant_config, bias=config.mlp_bias, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class GqlaModel(nn.Module):
    """Embeddings, GQLA decoder layers, final norm."""

    def __init__(self, *, vllm_config: VllmConfig, plan: ServingPlan, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        spec = _gqla_spec(config)
        positions = max(config.max_position_embeddings, vllm_config.model_config.max_model_len)
        tables: dict[tuple[int, ...], torch.Tensor] = {}  # layers sharing a frequency selection share a table
        layers = []
        for i in range(config.num_hidden_layers):
            key = tuple(config.layer_frequency_indices(i))
            table = tables.setdefault(key, _gqla_rope_table(config, i, positions))
            layer_prefix = f"{prefix}.layers.{i}"
            attention = _attention(spec, plan, table, vllm_config, f"{layer_prefix}.self_attn")
            layers.append(GqlaDecoderLayer(config, attention, vllm_config, layer_prefix))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names as in ``modeling_gqla``; gate_proj and up_proj go into vLLM's merged gate_up_proj."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb." in name:
                continue
            for merged, part, shard in (("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)):
                if f".{part}." in name:
                    name = name.replace(part, merged)
                    params[name].weight_loader(params[name], tensor, shard)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded


class GqlaForCausalLM(nn.Module):
    """vLLM model of ``GqlaForCausalLM`` checkpoints (TransGQLA results), on the absorbed or grouped path."""

    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.serving_plan = _plan_of(config, vllm_config)
        self.model = GqlaModel(vllm_config=vllm_config, plan=self.serving_plan, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["lm_head."] if self.config.tie_word_embeddings else None
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=skip).load_weights(weights)


# ---- DeepSeek checkpoints regrouped in their own family

def _family_rope_table(config: Any, d_r: int, max_position: int) -> torch.Tensor:
    """The cos|sin table vLLM's own DeepSeek layers build for this config (yarn scaling included)."""
    rope = get_rope(d_r, max_position=max_position, rope_parameters=config.rope_parameters, is_neox_style=False)
    return rope.cos_sin_cache.detach().float().cpu()


class _RegroupedAttentionFactory:
    """Stands in for vLLM's DeepSeek attention classes while a regrouped model is built: same arguments,
    returns a ``GqlaServingAttention``."""

    def __init__(self, plan: ServingPlan, vllm_config: VllmConfig) -> None:
        self.plan, self.vllm_config = plan, vllm_config
        self.table: torch.Tensor | None = None

    def __call__(self, *, config: Any, qk_rope_head_dim: int, max_position_embeddings: int = 8192,
                 prefix: str = "", **_stock_arguments: Any) -> GqlaServingAttention:
        params = config.rope_parameters
        if params["rope_type"] != "default":  # as vLLM's DeepSeek attention renames them
            params["rope_type"] = ("deepseek_llama_scaling" if params.get("attention_factor") == 1.0
                                   else "deepseek_yarn")
        if self.table is None:
            self.table = _family_rope_table(config, qk_rope_head_dim, max_position_embeddings)
        scale = (config.qk_nope_head_dim + qk_rope_head_dim) ** -0.5
        if params["rope_type"] == "deepseek_yarn":
            mscale = deepseek_v2.yarn_get_mscale(params["factor"], float(params.get("mscale_all_dim", False)))
            scale = scale * mscale * mscale
        spec = AttentionSpec(dims=LatentDims.from_config(config), scale=scale, eps=config.rms_norm_eps,
                             latent_norm=True, qkv_bias=False, o_bias=False,
                             rope_neox=not getattr(config, "rope_interleave", True), up_projection_per_head=True)
        return _attention(spec, self.plan, self.table, self.vllm_config, prefix)


@contextlib.contextmanager
def _deepseek_attention(factory: _RegroupedAttentionFactory) -> Iterator[None]:
    """While building the model, vLLM's DeepSeek decoder layers construct ``factory`` products."""
    saved = deepseek_v2.DeepseekV2MLAAttention, deepseek_v2.DeepseekV2Attention
    deepseek_v2.DeepseekV2MLAAttention = deepseek_v2.DeepseekV2Attention = factory
    try:
        yield
    finally:
        deepseek_v2.DeepseekV2MLAAttention, deepseek_v2.DeepseekV2Attention = saved


class _RegroupedMixin:
    """vLLM's DeepSeek model, with GQLA attention layers when the checkpoint is regrouped."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if not is_regrouped(config):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            return
        if getattr(config, "index_topk", None) is not None:
            raise GqlaServingError("a regrouped checkpoint with sparse attention (DeepSeek-V3.2's indexer) is not "
                                   "served by the GQLA plugin yet; serve the checkpoint before regrouping")
        if getattr(config, "attention_bias", False):
            raise GqlaServingError("a regrouped checkpoint with attention biases is not served by the GQLA plugin "
                                   "(vLLM's DeepSeek layers have none either); serve it through transformers")
        plan = _plan_of(config, vllm_config)
        with _deepseek_attention(_RegroupedAttentionFactory(plan, vllm_config)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.serving_plan = plan


class GqlaDeepseekV2ForCausalLM(_RegroupedMixin, deepseek_v2.DeepseekV2ForCausalLM):
    """``DeepseekV2ForCausalLM``; regrouped checkpoints get GQLA attention."""


class GqlaDeepseekV3ForCausalLM(_RegroupedMixin, deepseek_v2.DeepseekV3ForCausalLM):
    """``DeepseekV3ForCausalLM``; regrouped checkpoints get GQLA attention."""
