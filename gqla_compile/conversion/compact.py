"""The compact form of a regrouped latent model: a GqlaForCausalLM (``kv_b_proj`` once per group, RoPE rows in
rotate_half order), only where it reproduces the family-form result; otherwise a ConversionError names what it
cannot hold (MoE weights, several blocks per layer, unrotated RoPE dims, config fields such as MiniCPM3's
scales)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..configuration_gqla import GqlaConfig
from ..errors import ConversionError
from ..modeling_gqla import GqlaForCausalLM
from ..verification import relative_error, reproduction_tolerance
from .common import as_float64, gqla_model_from_state, model_wide_config_fields
from .latent_blocks import LatentBlock

__all__ = ["gqla_config_for_latent", "expected_state_names", "check_compact_layout", "compact_model",
           "check_compact_reproduces"]


def _compact_layout(block: LatentBlock, tensors: dict[str, torch.Tensor], num_groups: int) -> dict[str, torch.Tensor]:
    """One block's family-layout tensors in GqlaForCausalLM's layout: kv_b_proj once per group, RoPE rows of the
    query and of the down-projection in rotate_half order."""
    d = block.dims
    rope = torch.tensor(block.rope_order, dtype=torch.long)
    compact = dict(tensors)
    for name, value in tensors.items():
        if name.startswith(("q_proj.", "q_b_proj.")):
            rows = value.view(d.n_h, d.d_qk, -1)
            compact[name] = torch.cat([rows[:, : d.d_n], rows[:, d.d_n :][:, rope]], dim=1).reshape(value.shape)
    down = block.module.kv_a_proj_with_mqa
    rows = torch.cat([torch.arange(d.d_c), d.d_c + rope])
    compact["kv_a_proj_with_mqa.weight"] = as_float64(down.weight)[rows]
    if down.bias is not None:
        compact["kv_a_proj_with_mqa.bias"] = as_float64(down.bias)[rows]
    per_head = tensors["kv_b_proj.weight"].view(d.n_h, d.d_n + d.d_v, d.d_c)
    compact["kv_b_proj.weight"] = per_head[:: d.n_h // num_groups].reshape(-1, d.d_c)
    return compact


def gqla_config_for_latent(source: nn.Module, blocks: Sequence[LatentBlock], num_groups: int) -> GqlaConfig:
    cfg = source.config
    d = blocks[0].dims
    attn = blocks[0].module
    q_first = attn.q_proj if getattr(attn, "q_proj", None) is not None else attn.q_a_proj
    has_norm = isinstance(getattr(attn, "kv_a_layernorm", None), nn.Module)
    mlp = source.model.layers[0].mlp
    # the attention dims as a GQLA config names them (heads, groups, ranks, head dims, hidden size)
    latent = {name: value for name, value in vars(replace(d, n_g=num_groups).as_config(len(blocks))).items()
              if name not in ("model_type", "num_hidden_layers")}
    return GqlaConfig(
        **model_wide_config_fields(cfg),
        **latent,
        intermediate_size=getattr(getattr(mlp, "gate_proj", None), "out_features", None) or cfg.intermediate_size,
        attention_bias=q_first.bias is not None or attn.kv_a_proj_with_mqa.bias is not None,
        attention_output_bias=attn.o_proj.bias is not None,
        mlp_bias=getattr(getattr(mlp, "gate_proj", None), "bias", None) is not None,
        kv_a_layernorm=has_norm,
        softmax_scale=blocks[0].scaling,
        # a GQLA source's RoPE table (TransGQLA keeps the source's frequencies); None for MLA families
        rope_frequency_dim=getattr(cfg, "rope_frequency_dim", None),
        rope_frequency_indices=getattr(cfg, "rope_frequency_indices", None),
        rope_layer_frequency_indices=getattr(cfg, "rope_layer_frequency_indices", None),
    )


def expected_state_names(config: GqlaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GqlaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_compact_layout(source: nn.Module, blocks: Sequence[LatentBlock], expected: dict[str, tuple[int, ...]]) -> None:
    """ConversionError (before any calibration) when the source has what a GqlaForCausalLM cannot hold."""
    elsewhere = [b.path for b in blocks if b.layer_index is None]
    if elsewhere:
        raise ConversionError(
            f"latent attention at {elsewhere[0]}, which is not model.layers[i].self_attn (e.g. several attention "
            "blocks per layer): GqlaForCausalLM has one per layer; keep the family's layout (output='family')"
        )
    layers = source.model.layers
    if len(blocks) != len(layers):
        missing = sorted(set(range(len(layers))) - {b.layer_index for b in blocks})
        raise ConversionError(f"latent attention was detected in {len(blocks)} of {len(layers)} layers (not in {missing}); "
                              "GqlaForCausalLM needs every layer to be latent attention; keep the family's layout "
                              "(output='family')")
    for block in blocks[1:]:
        if (block.dims.as_dict() | {"n_g": 0}) != (blocks[0].dims.as_dict() | {"n_g": 0}) or block.scaling != blocks[0].scaling:
            raise ConversionError(f"{block.path} has other dims than {blocks[0].path}; a GqlaConfig has one shape for "
                                  "all layers; keep the family's layout (output='family')")
    unrotated = [b.path for b in blocks if b.rope_layout == "none" and b.dims.d_R]
    if unrotated:
        raise ConversionError(f"{unrotated[0]} does not rotate its {blocks[0].dims.d_R} RoPE key dims, which "
                              "GqlaForCausalLM always rotates; keep the family's layout (output='family')")
    source_names = {n: tuple(t.shape) for n, t in source.state_dict().items()}
    unused = sorted(n for n in source_names if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ConversionError(
            f"{type(source).__name__} has weights GqlaForCausalLM has no place for (e.g. {', '.join(unused[:3])}): "
            "only dense-MLP decoders have a compact form (MoE layers do not); keep the family's layout "
            "(output='family')"
        )


def compact_model(source: nn.Module, blocks: Sequence[LatentBlock], layer_tensors: Sequence[dict[str, torch.Tensor]],
                   config: GqlaConfig, expected: dict[str, tuple[int, ...]], dtype: torch.dtype) -> nn.Module:
    """The GqlaForCausalLM holding the regrouped blocks and the source's other weights."""
    state = {name: t for name, t in source.state_dict().items() if name in expected}
    for block, tensors in zip(blocks, layer_tensors):
        compact = _compact_layout(block, tensors, config.num_key_value_heads)
        state.update({f"{block.path}.{name}": t for name, t in compact.items()})
    for name, shape in expected.items():  # biases the source lacks (e.g. q_proj's when kv_a has one): zero
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros(shape)
    missing = set(expected) - set(state)
    if missing:
        raise ConversionError(f"no source weights for {sorted(missing)[:3]}")
    return gqla_model_from_state(source, config, state, dtype)


def check_compact_reproduces(family: nn.Module, compact: nn.Module) -> None:
    """ConversionError naming the source's config fields GqlaConfig lacks when the compact model computes
    something else than the family's (e.g. MiniCPM3's embedding, residual and logit scales)."""
    vocab_size = family.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    device = next(family.parameters()).device
    with torch.no_grad():
        expected = family(input_ids=ids.to(device), use_cache=False).logits.double()
        actual = compact.to(device)(input_ids=ids.to(device), use_cache=False).logits.double()
    error = relative_error(actual, expected)
    tolerance = reproduction_tolerance(family.dtype)
    if not error <= tolerance:
        known = set(GqlaConfig().to_dict())
        fields = sorted(k for k, v in family.config.to_dict().items()
                        if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConversionError(
            f"GqlaForCausalLM does not reproduce {type(family).__name__} (relative logit error {error:.2g}): it has no "
            f"place for what the family's config fields {', '.join(fields) or '(none)'} describe; keep the family's "
            "layout (output='family')"
        )
