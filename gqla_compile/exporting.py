"""Export a GqlaForCausalLM as a checkpoint of a stock transformers family, for serving engines.

``export(model, out_dir, format="deepseek_v3")`` writes a DeepSeek-V3 checkpoint (safetensors, atomic) that
``DeepseekV3ForCausalLM`` (and engines with DeepSeek-V3 MLA kernels) load with no code of ours. GQLA is MLA
whose up-projection is shared by the heads of a group, so the group's ``kv_b_proj`` block is repeated for each
of its heads (the cache and the latent stay the same; the compiler's probing finds n_g again). What
DeepSeek-V3's layout has no field for is carried exactly where an identity allows it, else refused:

- softmax scale: folded into the query rows (scores are linear in q), DeepSeek-V3's own scale is kept;
- RoPE: GQLA's rotate_half pairs are written in DeepSeek-V3's interleaved layout (``rope_interleave=True``,
  what DeepSeek-V3 checkpoints and engines use), each pair at the pair of DeepSeek-V3's one frequency table
  that rotates at its frequency (``export_layout``): a selected frequency subset (TransGQLA's
  ``rope_frequency_indices``, per layer or shared) is exact when that table holds it, and is refused otherwise;
- latent size (``pad_latent``): MLA kernels (FlashMLA, vLLM's CPU MLA) take a 512 + 64 latent only. By default
  a model with another latent is padded to it exactly (zero rows and columns, the latent norm's scale and the
  RoPE pair frequencies kept; ``export_layout``), with a warning giving the cache it costs; ``pad_latent=False``
  keeps GQLA's sizes, ``pad_latent=True`` refuses what cannot be padded;
- biases: on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` DeepSeek-V3 has them (``attention_bias``;
  a missing one is written as zeros) but engines may ignore them: a warning; a bias on a plain ``q_proj`` or
  on the MLP has no place: refused when non-zero;
- no latent norm (``kv_a_layernorm=False``, TransGQLA results from GQA models): DeepSeek-V3 always
  RMS-normalises the latent, so the export writes an *inert* one: the latent rows of ``kv_a_proj_with_mqa``
  are scaled by a small s and the norm's gain is sqrt(eps) / s. Then mean(x^2) << eps for every input the
  layer can see (bounded through the input norm's gain, see ``inert_latent_norm``), the norm divides by
  sqrt(eps) and hands back the latent to within a relative 1e-8. That needs every loader to use the same eps:
  transformers builds the latent norm with 1e-6 whatever the config says, serving engines with
  ``rms_norm_eps``, so a model whose ``rms_norm_eps`` is not 1e-6 is refused;
- dense MLP: written as a DeepSeek-V3 without MoE layers (``first_k_dense_replace = num_hidden_layers``).

The exported model is checked against the source on a fixed batch of random tokens before it is returned
(as ``optimize`` checks its rewrites): a difference above the dtype's tolerance is an error, never a file.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.initialization import no_init_weights

from .conversion.mla import RECORD_FIELD
from .errors import ConversionError
from .export_layout import ENGINE_LATENT_DIM, ENGINE_ROPE_DIM, ExportLayout, padded_layout, unpadded_layout
from .verification import relative_error, reproduction_tolerance

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "export", "to_deepseek_v3"]

FORMATS = ("deepseek_v3",)
#: The epsilon transformers' DeepSeek-V3 builds its latent norm with, whatever ``rms_norm_eps`` says.
LATENT_NORM_EPS = 1e-6
#: The rope types serving engines' DeepSeek-V3 implement as transformers does (vLLM: models/deepseek_v2.py).
ENGINE_ROPE_TYPES = ("default", "yarn")
#: The largest relative change an inert latent norm may make to a latent, over every input.
INERT_NORM_DEVIATION = 1e-8


def export(model: nn.Module, out_dir: str | os.PathLike, *, format: str = "deepseek_v3",
           pad_latent: bool | None = None, force: bool = False) -> Path:
    """Write ``model`` (a GqlaForCausalLM) into ``out_dir`` as a checkpoint of ``format``; see module docs.

    ``pad_latent``: pad the latent to 512 + 64 for MLA engines (True), keep GQLA's sizes (False), or pad when
    the latent is not 512 + 64 and can be padded (None, with a warning giving the cache it costs). Refuses an
    existing ``out_dir`` unless ``force`` (checked before any work; the folder is written to a temporary
    sibling and renamed into place). Raises ConversionError when the model has what the format cannot express
    exactly; nothing is written then.
    """
    from .checkpoint import check_output_free, save_pretrained_atomic

    if format not in FORMATS:
        raise ConversionError(f"format={format!r} is not known; use one of {', '.join(FORMATS)}")
    check_output_free(out_dir, force=force)
    exported = to_deepseek_v3(model, pad_latent=pad_latent)
    return save_pretrained_atomic(exported, out_dir, force=force)


def _require_gqla(model: nn.Module) -> None:
    from .modeling_gqla import GqlaForCausalLM

    if not isinstance(model, GqlaForCausalLM):
        raise ConversionError(
            f"export writes a GqlaForCausalLM, got {type(model).__name__}; a model regrouped in its own family by "
            "gqla_compile.convert is already a checkpoint of that family: save it with save_pretrained"
        )


def _nonzero(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and bool(tensor.detach().abs().max() > 0)


def choose_layout(model: nn.Module, pad_latent: bool | None) -> ExportLayout:
    """The exported latent and RoPE layout for ``pad_latent`` (see ``export``), warning when it pads by default."""
    config = model.config
    engine_sized = (config.kv_lora_rank, config.qk_rope_head_dim) == (ENGINE_LATENT_DIM, ENGINE_ROPE_DIM)
    if pad_latent is False or engine_sized:
        return unpadded_layout(config)
    if pad_latent:
        layout = padded_layout(config)
        logger.info("export: %s", _padding_cost(model, layout))
        return layout
    try:
        layout = padded_layout(config)
    except ConversionError as exc:
        logger.warning("export: the latent stays %d + %d dims, which MLA kernels built for %d + %d (FlashMLA, "
                       "vLLM) will refuse: it cannot be padded: %s", config.kv_lora_rank, config.qk_rope_head_dim,
                       ENGINE_LATENT_DIM, ENGINE_ROPE_DIM, exc)
        return unpadded_layout(config)
    logger.warning("export: %s; pass pad_latent=False to keep GQLA's latent (gqla_compile.optimize serves it)",
                   _padding_cost(model, layout))
    return layout


def _padding_cost(model: nn.Module, layout: ExportLayout) -> str:
    config = model.config
    element = next(model.parameters()).element_size()
    before = config.kv_lora_rank + config.qk_rope_head_dim
    after = layout.latent_dim + layout.rope_dim
    layers = config.num_hidden_layers
    return (f"padding the latent from {config.kv_lora_rank} + {config.qk_rope_head_dim} to {layout.latent_dim} + "
            f"{layout.rope_dim} dims so that MLA kernels load it; that costs KV cache: {before * element * layers} "
            f"-> {after * element * layers} bytes per token ({layers} layers, {element}-byte values, "
            f"x{after / before:.2f})")


def to_deepseek_v3(model: nn.Module, *, pad_latent: bool | None = None) -> nn.Module:
    """A DeepseekV3ForCausalLM computing what ``model`` (a GqlaForCausalLM) computes; see module docs and
    ``export`` for ``pad_latent``."""
    _require_gqla(model)
    config = model.config
    attention = [layer.self_attn for layer in model.model.layers]
    layout = choose_layout(model, pad_latent)
    biased = _check_exportable(model, layout)
    n_h, n_g = config.num_attention_heads, config.num_key_value_heads
    ds_config = _deepseek_v3_config(config, layout, biased)
    with no_init_weights():
        exported = DeepseekV3ForCausalLM(ds_config)
    dtype = next(model.parameters()).dtype
    scale = attention[0].scaling / exported.model.layers[0].self_attn.scaling
    state = _deepseek_v3_state(model, layout, scale)
    expected = exported.state_dict()
    for name, tensor in expected.items():  # biases GQLA lacks where DeepSeek-V3 has one: zero
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros_like(tensor)
    exported.load_state_dict({n: t.to(dtype) for n, t in state.items()}, strict=True, assign=True)
    if ds_config.tie_word_embeddings:
        exported.tie_weights()
    exported.generation_config = model.generation_config
    exported.eval()
    _check_reproduces(model, exported)
    logger.info("export: GqlaForCausalLM (%d groups) -> DeepseekV3ForCausalLM (kv_b_proj repeated %d times per "
                "group, softmax scale factor %.6g folded into the queries, latent %d + %d%s)", n_g, n_h // n_g, scale,
                layout.latent_dim, layout.rope_dim, "" if config.kv_a_layernorm else ", an inert latent norm")
    return exported


def _check_exportable(model: nn.Module, layout: ExportLayout) -> list[str]:
    """ConversionError for what DeepSeek-V3 has no place for; warnings for what only some loaders reproduce.
    Returns the attention projections with non-zero biases (exported as DeepSeek-V3's attention_bias)."""
    config = model.config
    attention = [layer.self_attn for layer in model.model.layers]
    if not config.kv_a_layernorm and not math.isclose(config.rms_norm_eps, LATENT_NORM_EPS):
        raise ConversionError(
            f"the model has no latent norm (kv_a_layernorm=False, as TransGQLA results from GQA models have) and "
            f"rms_norm_eps={config.rms_norm_eps:g}: DeepSeek-V3 always RMS-normalises the latent, and the inert norm "
            f"that stands in for none needs every loader to use one epsilon (transformers uses {LATENT_NORM_EPS:g}, "
            "serving engines rms_norm_eps). Serve this model with gqla_compile.optimize instead, or convert a "
            f"source whose rms_norm_eps is {LATENT_NORM_EPS:g}"
        )
    mlp_biases = [n for n, p in model.named_parameters() if ".mlp." in n and n.endswith(".bias") and _nonzero(p)]
    if mlp_biases:
        raise ConversionError(f"the MLP has biases ({mlp_biases[0]}, ...), which DeepSeek-V3's MLP has no place for")
    if config.q_lora_rank is None and any(_nonzero(a.q_proj.bias) for a in attention):
        raise ConversionError("q_proj has a bias, which DeepSeek-V3's q_proj (without q_lora_rank) has no place for")
    rope_type = layout.rope_parameters.get("rope_type", "default")
    if rope_type not in ENGINE_ROPE_TYPES:
        logger.warning("export: rope_type %r: transformers' DeepSeek-V3 reproduces it, serving engines' DeepSeek-V3 "
                       "may not (vLLM reads every rope type other than default as DeepSeek's YaRN)", rope_type)
    biased = sorted({name.split(".")[-2] for name, p in model.named_parameters()
                     if ".self_attn." in name and name.endswith(".bias") and _nonzero(p)})
    if biased:
        logger.warning("exporting attention biases (%s) as DeepSeek-V3's attention_bias: transformers loads them, "
                       "serving engines' DeepSeek-V3 implementations may ignore them", ", ".join(biased))
    return biased


def _deepseek_v3_config(config: Any, layout: ExportLayout, biased: list[str]) -> Any:
    """The DeepseekV3Config of the export (one dense MLP per layer, no MoE, no MTP), recording how it was made."""
    n_h, n_g = config.num_attention_heads, config.num_key_value_heads
    ds_config = DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=n_h, num_key_value_heads=n_h, n_shared_experts=1, n_routed_experts=1,
        num_experts_per_tok=1, n_group=1, topk_group=1, first_k_dense_replace=config.num_hidden_layers,
        kv_lora_rank=layout.latent_dim, q_lora_rank=config.q_lora_rank, qk_rope_head_dim=layout.rope_dim,
        qk_nope_head_dim=config.qk_nope_head_dim, v_head_dim=config.v_head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=layout.rope_parameters, rope_interleave=True,
        attention_bias=bool(biased), pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, num_mtp_layers=0,
    )
    record = {
        "method": "export of a GqlaForCausalLM: each group's kv_b_proj block repeated for its heads, softmax scale "
                  "folded into the queries, RoPE pairs in DeepSeek-V3's interleaved layout",
        "output": "deepseek_v3", "num_groups": n_g, "source_num_groups": n_g, "source_conversion": config.conversion,
    }
    if layout.padded:  # which dims carry the model: the rest are zero rows and columns
        record["padded_from"] = {"kv_lora_rank": config.kv_lora_rank, "qk_rope_head_dim": config.qk_rope_head_dim,
                                 "rope_pairs": layout.slots}
    setattr(ds_config, RECORD_FIELD, record)
    return ds_config


def _deepseek_v3_state(model: nn.Module, layout: ExportLayout, scale: float) -> dict[str, torch.Tensor]:
    """The GQLA state dict in DeepSeek-V3's names and ``layout`` (padded or not)."""
    config = model.config
    n_h, n_g = config.num_attention_heads, config.num_key_value_heads
    d_n, d_r, d_c = config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
    state = {n: t.detach() for n, t in model.state_dict().items()}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        place = _RopeRows(layout.slots[i], layout.rope_dim)
        for name in ("q_proj.weight", "q_proj.bias", "q_b_proj.weight"):
            if prefix + name in state:
                value = state[prefix + name]
                rows = value.reshape(n_h, d_n + d_r, -1)
                rows = torch.cat([rows[:, :d_n], place(rows[:, d_n:], dim=1)], dim=1) * scale
                state[prefix + name] = rows.reshape(n_h * (d_n + layout.rope_dim), *value.shape[1:])
        latent_scale = layout.latent_scale
        if not config.kv_a_layernorm:
            latent_scale, gain = inert_latent_norm(model.model.layers[i])
            gains = torch.full((d_c,), gain, dtype=torch.float64)
        else:
            gains = state[prefix + "kv_a_layernorm.weight"].double() / layout.latent_scale
        state[prefix + "kv_a_layernorm.weight"] = _pad(gains, 0, layout.latent_dim)
        for name in ("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias"):
            if prefix + name in state:
                value = state[prefix + name].double()
                latent = _pad(value[:d_c] * latent_scale, 0, layout.latent_dim)
                state[prefix + name] = torch.cat([latent, place(value[d_c:], dim=0)])
        groups = state[prefix + "kv_b_proj.weight"].reshape(n_g, -1, d_c)
        repeated = groups.repeat_interleave(n_h // n_g, dim=0).reshape(-1, d_c)
        state[prefix + "kv_b_proj.weight"] = _pad(repeated, 1, layout.latent_dim)
    return state


class _RopeRows:
    """GQLA's RoPE rows (rotate_half: pair p is rows p, p + d_R/2) in DeepSeek-V3's interleaved layout of
    ``rope_dim`` rows (pair j is rows 2j, 2j + 1), pair p at ``slots[p]``; the other rows are zero."""

    def __init__(self, slots: list[int], rope_dim: int):
        half = len(slots)
        self.source = torch.tensor([row for p in range(half) for row in (p, p + half)])
        self.target = torch.tensor([row for j in slots for row in (2 * j, 2 * j + 1)])
        self.rope_dim = rope_dim

    def __call__(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(rows.shape)
        shape[dim] = self.rope_dim
        return rows.new_zeros(shape).index_copy_(dim, self.target, rows.index_select(dim, self.source))


def _pad(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` with zeros appended along ``dim`` up to ``size``."""
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def inert_latent_norm(layer: nn.Module) -> tuple[float, float]:
    """(s, gain) that make DeepSeek-V3's latent RMSNorm hand back ``layer``'s latent unchanged.

    The norm computes gain * x / sqrt(mean(x^2) + eps) with x = s c. The layer's input is the output of its
    input RMSNorm, whose norm is at most max|g_in| sqrt(D), so mean(c^2) <= m = (sigma_max(W_c) max|g_in|
    sqrt(D) + |b_c|)^2 / d_c for every input. With s^2 m = 2 INERT_NORM_DEVIATION eps and gain = sqrt(eps) / s
    the output is c / sqrt(1 + s^2 mean(c^2) / eps), within a relative INERT_NORM_DEVIATION of c.
    """
    attention = layer.self_attn
    d_c = attention.kv_lora_rank
    down = attention.kv_a_proj_with_mqa
    weight = down.weight.detach()[:d_c].double()
    bias = down.bias.detach()[:d_c].double().norm().item() if down.bias is not None else 0.0
    gain_in = layer.input_layernorm.weight.detach().double().abs().max().item()
    bound = (torch.linalg.matrix_norm(weight, ord=2).item() * gain_in * math.sqrt(weight.shape[1]) + bias) ** 2 / d_c
    shrink = math.sqrt(2 * INERT_NORM_DEVIATION * LATENT_NORM_EPS / max(bound, 1e-30))
    return shrink, math.sqrt(LATENT_NORM_EPS) / shrink


def _check_reproduces(model: nn.Module, exported: nn.Module) -> None:
    """Raise ConversionError when ``exported`` does not give ``model``'s logits on a fixed random batch."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    # the second row sits at the end of the position range, where every RoPE pair (the slow ones too) has turned
    positions = torch.arange(16, device=device).repeat(2, 1)
    positions[1] += max(model.config.max_position_embeddings - 16, 0)
    with torch.no_grad():
        want = model(input_ids=tokens, position_ids=positions, use_cache=False).logits.double()
        got = exported(input_ids=tokens, position_ids=positions, use_cache=False).logits.double()
    error = relative_error(got, want)
    tolerance = reproduction_tolerance(dtype)
    if not error <= tolerance:
        raise ConversionError(
            f"the DeepSeek-V3 export does not reproduce the model (relative logit error {error:.2e} > "
            f"{tolerance:.0e}); nothing was written. Please report this model"
        )
    logger.info("export reproduces the model: relative logit error %.2e", error)
