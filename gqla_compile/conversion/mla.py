"""TransGQLA for latent-attention checkpoints: MLA (DeepSeek-V2/V3 style, n_g = n_h) or GQLA -> GQLA with fewer groups.

The latent c, the shared RoPE key and everything outside attention stay as they are; only the up-projections
are regrouped. Per layer, with C = E[c c^T] (float64, over calibration tokens, optionally weighted) and the
heads of one new group G stacked, M = [W_UK^h]_{h in G} (m d_n x d_c):

- whiten: X_h = W_UK^h C^{1/2}; stack X = [X_h]; SVD X = U S V^T; keep the top d_n right singular vectors V.
- shared up-projection of the group: W_UK^G = diag(sigma) V^T C^{-1/2} (sigma = S / sqrt(m): the group's key has
  the scale of one head's key);
- head map A_h = X_h V diag(1 / sigma) (d_n x d_n), so that A_h W_UK^G = W_UK^h C^{1/2} V V^T C^{-1/2}, the best
  approximation of W_UK^h on the calibration latents (Eckart-Young in the C-metric). The head's score
  q_h . A_h W_UK^G c = (A_h^T q_h) . W_UK^G c, so A_h^T is folded into q_h's no-RoPE rows.
- values likewise (d_v directions), with B_h folded into o_proj's columns of head h.

C is damped (C + 1e-6 mean(diag C) I) and C^{1/2}, C^{-1/2} come from the same eigendecomposition, so they are
exact inverses: with n_g = n_h (m = 1, rank d_n) the conversion reproduces the model up to rounding.

Options:

- ``score_aware``: weight the PCA by what the heads do with keys and values: each head's key rows by the
  square root of its queries' second moment E[q_h q_h^T] (so the kept subspace preserves the scores
  q . k rather than the keys), each head's value rows by (W_O,h^T W_O,h)^{1/2} (so it preserves the output
  projection of the values). A_h and B_h stay the least-squares maps (they do not depend on a left weight).
- ``grouping="similarity"``: heads assigned to equal-size groups by how well their (whitened) key and value
  row spaces share one d_n (d_v) dim basis: greedy construction, then pairwise swaps, started from both
  the greedy and the neighbour grouping, keeping the one of least calibration residual (so it is never worse
  than neighbour grouping on the calibration data). The permutation is applied to q head blocks and o_proj
  column blocks.
- ``weighting="loss"``: each calibration token's latent is weighted by the original model's next-token loss
  at that position (normalised to mean 1 per batch): the latents of positions the model finds hard count
  more (the last position, which has no target, gets weight 1).

Finding the blocks: the compiler's detector (``capture_candidates`` + ``passes.detect.detect_blocks``, the
entry point ``optimize`` uses, with the same guards and named reasons) finds every latent-attention block
wherever it sits (several per layer, hybrid models' latent layers), its dims, its softmax scale and (by
probing) the per-head up-projections W_UK^h, W_UV^h; the layout of the RoPE key is settled by evaluating the captured graph (rotate_half, interleaved
pairs, or none: not rotated). Blocks with attention that it cannot trace or match are left as they are, with
a ``PartialRewriteWarning`` naming them and why. Once the detector has confirmed a block, its q / kv_a / o
weights are read by the DeepSeek names that every transformers MLA family shares (``q_proj`` or
``q_a_proj``/``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``o_proj``).

The result (``output=``):

- ``"family"`` (default): a copy of the source, same class, config and modules; only each block's query,
  ``kv_b_proj`` (each group's up-projection repeated for the heads of the group) and ``o_proj`` change, so
  every other weight (experts, routers, norms, scales, lm_head) is bit-identical and the checkpoint loads
  in stock transformers; ``config.gqla_conversion`` records the conversion.
- ``"gqla"``: a GqlaForCausalLM (``kv_b_proj`` once per group, RoPE rows in rotate_half order), only where it
  reproduces the family-form result (checked on a probe input); otherwise a ConversionError names what the
  compact form cannot hold (MoE weights, several blocks per layer, unrotated RoPE dims, config fields such
  as MiniCPM3's scales).

Modules: latent_blocks.py (finding the blocks), latent_statistics.py (C and the query moments), grouping.py
(the per-group PCA and the similarity grouping), regroup.py (one block), compact.py (the compact form), this
file (the options, the model).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConversionError, PartialRewriteWarning
from .calibration import Calibration
from .common import output_dtype
from .compact import (check_compact_layout, check_compact_reproduces, compact_model, expected_state_names,
                      gqla_config_for_latent)
from .grouping import group_basis, similarity_grouping
from .latent_blocks import CandidateSummary, LatentBlock, find_latent_blocks
from .latent_statistics import LatentStatistics, collect_latent_statistics
from .regroup import convert_layer

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPINGS",
    "WEIGHTINGS",
    "OUTPUTS",
    "RECORD_FIELD",
    "LatentBlock",
    "find_latent_blocks",
    "collect_latent_statistics",
    "group_basis",
    "similarity_grouping",
    "convert_layer",
    "gqla_config_for_latent",
    "convert_mla",
]

GROUPINGS = ("neighbour", "similarity")
WEIGHTINGS = (None, "loss")
OUTPUTS = ("family", "gqla")
RECORD_FIELD = "gqla_conversion"  # the config field a regrouped family checkpoint records its conversion in


def _check_gates(blocks: Sequence[LatentBlock]) -> None:
    """Regrouping writes each group's values in a new basis and undoes it in o_proj; a gate that multiplies
    every value channel (rather than a whole head) sits between the two and does not follow the basis, so
    the result would compute something else: refused before any work."""
    for block in blocks:
        if block.output_gate_width > 1:
            raise ConversionError(
                f"{block.path}: its output gate multiplies each of the {block.dims.d_v} value channels of a head "
                "separately; regrouping rewrites the values in a new basis per group, which such a gate does not "
                "follow, so the regrouped model would not be this one. Regrouping supports blocks without a gate or "
                "with one gate value per head; optimize still rewrites this model as it is"
            )


def _check_options(num_groups: int, n_h: int, grouping: str, weighting: str | None) -> None:
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or n_h % num_groups:
        divisors = [g for g in range(1, n_h + 1) if n_h % g == 0]
        raise ConversionError(
            f"num_groups={num_groups} does not divide the {n_h} query heads into equal groups; "
            f"choose one of {divisors}"
        )
    if grouping not in GROUPINGS:
        raise ConversionError(f"grouping={grouping!r} is not known; use one of {', '.join(GROUPINGS)}")
    if weighting not in WEIGHTINGS:
        raise ConversionError(f"weighting={weighting!r} is not known; use None or 'loss'")


def _regrouped_copy(model: nn.Module, blocks: Sequence[LatentBlock], layer_tensors: Sequence[dict[str, torch.Tensor]],
                    dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``model`` (same class, config and modules) whose attention blocks hold the new tensors."""
    new = copy.deepcopy(model)
    if dtype is not None:
        new.to(dtype)
    with torch.no_grad():
        for block, tensors in zip(blocks, layer_tensors):
            module = new.get_submodule(block.path)
            for name, value in tensors.items():
                parameter = module.get_parameter(name)
                parameter.copy_(value.to(parameter.dtype))
    return new.eval()


def _check_found(model: nn.Module, blocks: list[LatentBlock], candidates: CandidateSummary,
                 options: dict[str, Any]) -> None:
    """ConversionError when there is nothing to regroup (naming why: latent attention with a piece no path
    handles, or none at all); a PartialRewriteWarning naming the blocks with attention that are left as they are."""
    if not blocks and candidates.unsupported:
        listed = "; ".join(f"{path}: {why}" for path, why in candidates.unsupported)
        raise ConversionError(
            f"{type(model).__name__} holds latent attention that cannot be converted yet ({listed}); the piece named "
            "must be supported by the compiler (report it)"
        )
    if not blocks:
        config = getattr(model, "config", None)
        n_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        asked = ", ".join(f"{k}={v!r}" for k, v in options.items() if v is not None)
        raise ConversionError(
            f"{asked}: {type(model).__name__} holds no latent attention (the detector checked {candidates.checked} candidate "
            "blocks), so there are no latent groups to regroup; these options are for latent-attention (MLA/GQLA) "
            "models. A GQA model (Llama, Qwen2, Mistral) converts with TransGQLA (kv_lora_rank=, qk_rope_head_dim=) "
            f"to n_g = num_key_value_heads = {n_kv} groups"
        )
    if candidates.left_unchanged:
        listed = "; ".join(f"{path}: {why}" for path, why in candidates.left_unchanged)
        warnings.warn(f"partial conversion: {len(blocks)} latent block(s) converted, {len(candidates.left_unchanged)} "
                      f"block(s) with attention left as they are ({listed})", PartialRewriteWarning, stacklevel=3)


def _convert_blocks(blocks: Sequence[LatentBlock], stats: LatentStatistics, num_groups: int, grouping: str,
                    score_aware: bool, progress: bool) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """Every block regrouped: its new tensors and its record."""
    layer_tensors, records = [], []
    for i, block in enumerate(tqdm(blocks, desc="TransGQLA (latent)", unit="block", disable=not progress)):
        tensors, record = convert_layer(block, stats.latent[i], stats.query[i] if stats.query else None,
                                        num_groups, grouping, score_aware)
        layer_tensors.append(tensors)
        records.append({"block": block.path, "rope_layout": block.rope_layout, **record})
    return layer_tensors, records


def _conversion_record(model: nn.Module, *, output: str, source_groups: int, num_groups: int, grouping: str,
                       weighting: str | None, score_aware: bool, records: list[dict[str, Any]],
                       calibration: dict[str, Any]) -> dict[str, Any]:
    """How the model was regrouped (``config.gqla_conversion``, or ``config.conversion`` of the compact form)."""
    return {
        "method": "TransGQLA (latent): per-group PCA of the up-projected keys and values in the latent's "
                  "calibration metric, head maps folded into q and o_proj",
        "output": output,
        "source_architecture": type(model).__name__,
        "source_model_type": getattr(model.config, "model_type", None),
        "source_num_groups": source_groups,
        "num_groups": num_groups,
        "grouping": grouping,
        "permutation": [[h for g in r["groups"] for h in g] for r in records],
        "weighting": weighting,
        "score_aware": score_aware,
        "calibration": calibration,
        "layers": records,
    }


def convert_mla(
    model: nn.Module,
    calibration: Calibration,
    *,
    num_groups: int | None,
    dtype: torch.dtype | str | None,
    grouping: str | None = None,
    weighting: str | None = None,
    score_aware: bool = False,
    output: str = "family",
) -> nn.Module:
    """A latent-attention model (MLA or GQLA) regrouped to ``num_groups`` groups; see module docs (the work is in
    the modules named there).

    ``output="family"`` (default): a copy of ``model``, same class, config and modules, every weight outside the
    attention blocks bit-identical; the config records the conversion under ``gqla_conversion`` (a field stock
    transformers keeps and ignores). ``output="gqla"``: a GqlaForCausalLM, only where it reproduces the family
    (a dense DeepSeek-layout decoder); otherwise a ConversionError names what it cannot hold.
    """
    start = time.perf_counter()
    grouping = grouping or "neighbour"
    if output not in OUTPUTS:
        raise ConversionError(f"output={output!r} is not known; use 'family' (the source's own class) or 'gqla'")
    blocks, candidates = find_latent_blocks(model)
    _check_found(model, blocks, candidates, {
        "num_groups": num_groups, "grouping": grouping if grouping != "neighbour" else None, "weighting": weighting,
        "score_aware": score_aware or None})
    _check_gates(blocks)
    dims = blocks[0].dims
    num_groups = dims.n_g if num_groups is None else num_groups  # default: the source's own groups (exact)
    for n_h in sorted({b.dims.n_h for b in blocks}):
        _check_options(num_groups, n_h, grouping, weighting)
    compact = output == "gqla"
    if compact:
        config = gqla_config_for_latent(model, blocks, num_groups)
        expected = expected_state_names(config)
        check_compact_layout(model, blocks, expected)
    source_dtype = next(model.parameters()).dtype
    out_dtype = output_dtype(dtype, model)

    sequences = calibration.sequences(model.config.get_text_config().vocab_size)
    stats = collect_latent_statistics(model, blocks, sequences, weighting=weighting, queries=score_aware,
                                      batch_size=calibration.batch_size, progress=calibration.progress)
    layer_tensors, records = _convert_blocks(blocks, stats, num_groups, grouping, score_aware, calibration.progress)
    conversion = _conversion_record(
        model, output=output, source_groups=dims.n_g, num_groups=num_groups, grouping=grouping, weighting=weighting,
        score_aware=score_aware, records=records, calibration=calibration.record(len(sequences), stats.tokens))
    family = _regrouped_copy(model, blocks, layer_tensors, None if compact else out_dtype)
    if compact:
        config.conversion = conversion
        new = compact_model(model, blocks, layer_tensors, config, expected, source_dtype)
        check_compact_reproduces(family, new)
        new = new.to(out_dtype)
    else:
        setattr(family.config, RECORD_FIELD, conversion)
        new = family
    logger.info("TransGQLA (latent): %d blocks, %d -> %d groups (%s grouping, %s layout) in %.1f s; mean kept key "
                "energy %.3f", len(blocks), dims.n_g, num_groups, grouping, output, time.perf_counter() - start,
                sum(r["key_kept_energy"] for r in records) / len(records))
    return new
