"""TransGQLA: a GQA checkpoint (Llama, Qwen2, Mistral; MHA included) to a GQLA model (DESIGN.md section 1).

The model is converted layer by layer on calibration activations (``calibration.LayerStream``): the inputs of
layer i come from the model whose layers before i are already converted (``sequential``, the default) or from
the source. With x~ = [x; 1] the attention input with a constant appended (so biases ride along as one more
weight column) and C = E[x~ x~^T] its moment, per layer:

1. RoPE step (RoRoPE / FreqFold). Neighbouring rotary frequencies are folded into bands of b (a power of two);
   per band, the 2-D components (dims i and i + d_h/2) of its b frequencies and n_kv key heads are rotated by
   the eigenvectors of their energy. The same rotation on both components commutes with RoPE when b = 1 (and
   approximately within a band), so it folds into k_proj and the query. The m = (d_R/2) b / (d_h/2) leading
   component pairs of every band keep RoPE, rotated at a frequency of the band (pair j of band a at table
   frequency a b + floor(j b / m)); RoPE is dropped on the rest: the no-RoPE key of group g becomes
   k^n_g = P_g (I - R_S^T R_S) K, its query the original q_h (d_n = d_h), and the query's RoPE part is
   R_S P_g^T q_h. b = 1 is plain RoRoPE (one pair per frequency at d_R = d_h; everything, hence exact, at
   d_R = n_kv d_h, where b = 1 is the only choice); otherwise every layer takes the b whose converted attention
   output is closest to the source's on calibration data (wider bands also win at d_R = d_h: they give the
   leading directions of neighbouring frequencies the RoPE dims that weak ones would take). Per-layer
   frequency tables go into the config.
   (``rope_allocation="energy"`` ranks pairs by key energy across frequencies instead, one allocation for all
   layers; it is kept as a baseline: it drops RoPE on the fast frequencies, which carry the position
   information, so it loses more of the attention output than FreqFold.)
2. Balance: alpha = sqrt(E||k^n||^2 / E||V||^2), so that keys and values weigh alike in the PCA; with
   ``balance="auto"`` (default) the layer's chosen RoPE step is also built with alpha / 2 and 2 alpha, and the
   one whose attention output is closest to the source's on calibration data is kept: equal energies are not
   equal effects (an error in the keys passes through the softmax, one in the values does not), so the
   output error, not the energy ratio, decides.
3. Joint PCA of Y = [k^n_g / alpha ; V_g]_g (uncentered, so biases pass through the latent's bias) to d_c:
   the down-projection is R_c^T W_Y, the up-projection per group [alpha R_c(keys of g) ; R_c(values of g)].
4. Output fitting (``fit_output``, default): o_proj is linear in the heads' outputs, so it is refitted by least
   squares to the source attention's output on the same inputs; optionally (``fit_steps``) a few Adam steps
   on the layer's attention weights follow.
5. softmax_scale keeps the source's d_h^-0.5; everything outside attention is copied.

Modules: gqa_source.py (the source's shape, checks, weights), rope_allocation.py (step 1), latent_pca.py
(steps 2-3), fitting.py (choosing and step 4), this file (the layer loop and the model).

Weight algebra is float64 on CPU ("augmented" matrices: [out, D + 1], bias in the last column); the converted
layers run in the source's dtype and device for choosing, fitting and the sequential stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration_gqla import GqlaConfig
from ..errors import ConversionError
from .calibration import Calibration, LayerStream, attention_input_moment, collect_attention_input_moments
from .common import gqla_model_from_state, output_dtype
from .fitting import LayerBuilder, fit_output_projection, output_error, refine_attention
from .gqa_source import (ATTENTION_PROJECTIONS, SUPPORTED_ARCHITECTURES, GqaShape, augmented_weight, check_gqa_model,
                         check_ranks, gqla_config_for, warn_sliding_window)
from .latent_pca import (LatentBasis, LayerConversion, balance_alpha, build_layer_weights, joint_pca,
                         stack_compression_targets)
from .rope_allocation import (RopeChoice, allocate_rope_frequencies, band_energy, energy_ranked_rope,
                              freqfold_band_sizes, freqfold_rope, frequency_energy, nope_key_weights, query_weights,
                              rope_candidates, rope_key_rows, rorope_rotation)

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GqaShape",
    "convert_gqa",
    "check_gqa_model",
    "check_ranks",
    "RopeChoice",
    "band_energy",
    "frequency_energy",
    "rorope_rotation",
    "freqfold_band_sizes",
    "freqfold_rope",
    "allocate_rope_frequencies",
    "energy_ranked_rope",
    "rope_key_rows",
    "query_weights",
    "nope_key_weights",
    "balance_alpha",
    "stack_compression_targets",
    "joint_pca",
    "build_layer_weights",
    "augmented_weight",
    "gqla_config_for",
    "assemble_model",
    "Candidate",
]

RopeAllocation = Literal["freqfold", "energy"]
# Calibration batches on which the band size of each layer is chosen (the attention-output error decides).
CHOICE_BATCHES = 1
# Key/value balance scales tried against balance_alpha's (balance="auto"): the output error picks one per layer.
BALANCE_SCALES = (0.5, 2.0)


@dataclass
class Candidate:
    """One way to convert a layer (a RoPE step and a balance), built runnable and measured."""

    error: float  # relative attention-output error on the choice batches (0.0 when there is nothing to choose)
    rope: RopeChoice
    conversion: LayerConversion
    module: nn.Module  # the converted attention, in the source's dtype and device
    embeddings: list[tuple[torch.Tensor, torch.Tensor]]  # its rotary cos/sin per calibration batch


@dataclass
class _Recipe:
    """What converting every layer shares: the options, and what is built once for all layers."""

    shape: GqaShape
    kv_lora_rank: int
    qk_rope_head_dim: int
    rope_band_size: int | Literal["auto"]
    balance: str
    fit_output: bool
    fit_steps: int
    fit_lr: float
    basis: LatentBasis
    builder: LayerBuilder
    generator: torch.Generator
    energy_counts: list[int] | None  # rope_allocation="energy": the pairs kept per frequency, for all layers


def _is_replaced(name: str) -> bool:
    """State-dict names of the source's q/k/v projections (rebuilt by the conversion)."""
    return any(f".self_attn.{proj}." in name for proj in ATTENTION_PROJECTIONS)


def assemble_model(source: nn.Module, config: GqlaConfig, attention: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A GqlaForCausalLM holding the source's other weights (copied) and the new attention tensors, in ``dtype``."""
    state = {name: tensor for name, tensor in source.state_dict().items() if not _is_replaced(name)}
    state.update(attention)
    return gqla_model_from_state(source, config, state, dtype)


def _rope_choices(recipe: _Recipe, k_aug: torch.Tensor, moment: torch.Tensor) -> list[RopeChoice]:
    """The RoPE steps one layer chooses from (one under the energy ranking, shared by all layers)."""
    if recipe.energy_counts is not None:
        eigvals, eigvecs = rorope_rotation(frequency_energy(k_aug, moment, recipe.shape))
        return [energy_ranked_rope(eigvals, eigvecs, recipe.energy_counts, recipe.shape)]
    return rope_candidates(k_aug, moment, recipe.shape, recipe.qk_rope_head_dim, recipe.rope_band_size)


def _choose(recipe: _Recipe, stream: LayerStream, layer: nn.Module, index: int, moment: torch.Tensor,
            targets: list[torch.Tensor]) -> tuple[Candidate, dict[str, Any]]:
    """The layer's candidate of least attention-output error: over the RoPE steps, then (``balance="auto"``) over
    the chosen step's balance scaled by BALANCE_SCALES; and the errors seen, for the record."""
    ropes = _rope_choices(recipe, augmented_weight(layer.self_attn.k_proj), moment)
    measure = len(ropes) > 1 or recipe.balance == "auto"

    def candidate(rope: RopeChoice, alpha: float | None) -> Candidate:
        conversion = build_layer_weights(layer.self_attn, moment, rope, recipe.shape, recipe.kv_lora_rank,
                                         basis=recipe.basis, generator=recipe.generator, alpha=alpha)
        module, embeddings = recipe.builder.attention(index, conversion.tensors), recipe.builder.embeddings(rope, stream)
        error = output_error(stream, layer, module, embeddings, targets[:CHOICE_BATCHES]) if measure else 0.0
        return Candidate(error, rope, conversion, module, embeddings)

    built = [candidate(rope, None) for rope in ropes]
    best = min(built, key=lambda c: c.error)
    record: dict[str, Any] = {"band_size": best.rope.band_size,
                              "band_errors": {str(c.rope.band_size): c.error for c in built} if len(built) > 1 else {}}
    if recipe.balance == "auto":  # the chosen band's balance, scaled, against the default one
        scaled = [candidate(best.rope, best.conversion.alpha * scale) for scale in BALANCE_SCALES]
        record["balance_errors"] = {"1": best.error, **{str(s): c.error for s, c in zip(BALANCE_SCALES, scaled)}}
        best = min([best, *scaled], key=lambda c: c.error)
    return best, record


def _fit(recipe: _Recipe, stream: LayerStream, layer: nn.Module, best: Candidate,
         targets: list[torch.Tensor]) -> dict[str, float]:
    """Refit the chosen candidate's o_proj (``fit_output``) and refine its weights (``fit_steps``) in place; the
    fitted weights go back into its tensors. Returns what the fits measured, for the record."""
    record: dict[str, float] = {}
    module = best.module
    if recipe.fit_output:
        weight, bias, before, after = fit_output_projection(stream, layer, module, best.embeddings, targets)
        with torch.no_grad():
            module.o_proj.weight.copy_(weight)
            if bias is not None:
                module.o_proj.bias.copy_(bias)
        record.update(output_error_before_fit=before, output_error_after_fit=after)
    if recipe.fit_steps:
        record["refine_loss"] = refine_attention(stream, layer, module, best.embeddings, targets, recipe.fit_steps,
                                                 recipe.fit_lr)
    if recipe.fit_output or recipe.fit_steps:
        best.conversion.tensors.update({name: t.detach().double().cpu() for name, t in module.state_dict().items()})
    return record


def _convert_layer(recipe: _Recipe, stream: LayerStream, layer: nn.Module, index: int) -> tuple[Candidate, dict]:
    """One layer on the stream's current inputs: its moment, the source attention's outputs, the chosen
    candidate (fitted) and the layer's record."""
    with torch.no_grad():
        moment = attention_input_moment(stream.states, layer.input_layernorm)
        targets = [out for _, out in stream.attention_outputs(layer, layer.self_attn)]
    best, choice = _choose(recipe, stream, layer, index, moment, targets)
    record = {**best.conversion.record, **choice}
    record.update(_fit(recipe, stream, layer, best, targets))
    return best, record


def _energy_counts(model: nn.Module, sequences, shape: GqaShape, qk_rope_head_dim: int, batch_size: int,
                   progress: bool) -> list[int]:
    """The energy ranking's kept pairs per frequency, from every layer's attention-input moment of the source."""
    moments, _ = collect_attention_input_moments(model, sequences, batch_size=batch_size, progress=progress)
    eigvals = [rorope_rotation(frequency_energy(augmented_weight(layer.self_attn.k_proj), moment, shape))[0]
               for layer, moment in zip(model.model.layers, moments)]
    return allocate_rope_frequencies(torch.stack(eigvals), qk_rope_head_dim)


def _check_options(balance: str, rope_allocation: str) -> None:
    if balance not in ("auto", "rms"):
        raise ConversionError(f"unknown balance {balance!r}; use 'auto' or 'rms'")
    if rope_allocation not in ("freqfold", "energy"):
        raise ConversionError(f"unknown rope_allocation {rope_allocation!r}; use 'freqfold' or 'energy'")


def _conversion_record(model: nn.Module, recipe: _Recipe, *, rope_allocation: str, sequential: bool,
                       calibration: dict[str, Any], sliding_window_dropped: bool, records: list[dict]) -> dict[str, Any]:
    """How the model was converted (``config.conversion``): the method, the source, every option, per layer."""
    return {
        "method": "TransGQLA: RoRoPE/FreqFold, balanced joint PCA" + (", o_proj least squares" if recipe.fit_output else "")
                  + (f", {recipe.fit_steps} refinement steps" if recipe.fit_steps else ""),
        "source_architecture": type(model).__name__,
        "source_model_type": model.config.model_type,
        "source_num_key_value_heads": recipe.shape.n_kv,
        "source_head_dim": recipe.shape.d_h,
        "kv_lora_rank": recipe.kv_lora_rank,
        "qk_rope_head_dim": recipe.qk_rope_head_dim,
        "rope_allocation": rope_allocation,
        "rope_band_size": recipe.rope_band_size,
        "sequential": sequential,
        "fit_output": recipe.fit_output,
        "fit_steps": recipe.fit_steps,
        "balance": recipe.balance,
        "latent_basis": recipe.basis,
        "calibration": calibration,
        "sliding_window_dropped": sliding_window_dropped,
        "layers": records,
    }


def convert_gqa(
    model: nn.Module,
    calibration: Calibration,
    *,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    num_groups: int | None,
    dtype: torch.dtype | str | None,
    rope_band_size: int | Literal["auto"] = "auto",
    rope_allocation: RopeAllocation = "freqfold",
    sequential: bool = True,
    fit_output: bool = True,
    fit_steps: int = 0,
    fit_lr: float = 1e-4,
    balance: Literal["auto", "rms"] = "auto",
    _latent_basis: LatentBasis = "pca",
) -> nn.Module:
    """TransGQLA of a Llama / Qwen2 / Mistral model; see ``gqla_compile.convert`` (the work of a layer is in
    :func:`_convert_layer`).

    Layer by layer: the attention inputs of layer i come from the model whose layers before i are already
    converted (``sequential``; else from the source), their moment gives the RoPE step and the balanced joint
    PCA, then (``fit_output``) o_proj is refitted by least squares to the source attention's output on the same
    inputs, and (``fit_steps``) refined by a few Adam steps.
    """
    shape = check_gqa_model(model)
    check_ranks(shape, kv_lora_rank, qk_rope_head_dim, num_groups)
    _check_options(balance, rope_allocation)
    out_dtype = output_dtype(dtype, model)
    sliding_window_dropped = warn_sliding_window(model.config)
    sequences = calibration.sequences(model.config.vocab_size)
    layers = model.model.layers
    has_qkv_bias = any(getattr(layers[0].self_attn, name).bias is not None for name in ATTENTION_PROJECTIONS)
    energy_counts = (_energy_counts(model, sequences, shape, qk_rope_head_dim, calibration.batch_size,
                                    calibration.progress) if rope_allocation == "energy" else None)
    recipe = _Recipe(shape, kv_lora_rank, qk_rope_head_dim, rope_band_size, balance, fit_output, fit_steps, fit_lr,
                     _latent_basis, LayerBuilder(model, shape, kv_lora_rank, qk_rope_head_dim, has_qkv_bias),
                     torch.Generator().manual_seed(calibration.seed), energy_counts)
    stream = LayerStream(model, sequences, calibration.batch_size)
    attention, records, tables = _convert_layers(model, recipe, stream, sequential=sequential,
                                                 progress=calibration.progress)
    if not has_qkv_bias:
        attention = {name: t for name, t in attention.items() if not name.endswith(".bias") or ".o_proj." in name}
    conversion_record = _conversion_record(
        model, recipe, rope_allocation=rope_allocation, sequential=sequential,
        calibration=calibration.record(len(sequences), stream.num_tokens),
        sliding_window_dropped=sliding_window_dropped, records=records)
    config = gqla_config_for(
        model.config, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim, rope_frequency_indices=tables,
        attention_bias=has_qkv_bias, attention_output_bias=layers[0].self_attn.o_proj.bias is not None,
        conversion=conversion_record,
    )
    logger.info("TransGQLA: %d layers, mean kept key energy under RoPE %.3f, mean kept latent energy %.3f",
                len(records), sum(r["rope_kept_energy"] for r in records) / len(records),
                sum(r["latent_kept_energy"] for r in records) / len(records))
    return assemble_model(model, config, attention, out_dtype)


def _convert_layers(model: nn.Module, recipe: _Recipe, stream: LayerStream, *, sequential: bool, progress: bool
                    ) -> tuple[dict[str, torch.Tensor], list[dict], list]:
    """Every layer in order, the model in eval mode meanwhile: the new attention tensors by state-dict name, each
    layer's record and its RoPE frequency table. ``sequential``: the next layer's inputs come from the converted
    layer."""
    layers = model.model.layers
    attention: dict[str, torch.Tensor] = {}
    records, tables = [], []
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(len(layers)), desc="TransGQLA", unit="layer", disable=not progress):
            layer = layers[index]
            best, record = _convert_layer(recipe, stream, layer, index)
            attention.update({f"model.layers.{index}.self_attn.{name}": t for name, t in best.conversion.tensors.items()})
            records.append(record)
            tables.append(best.rope.frequency_indices)
            if sequential:
                stream.advance(layer, best.module, best.embeddings)
            else:
                stream.advance(layer, layer.self_attn)
    finally:
        model.train(was_training)
    return attention, records, tables
