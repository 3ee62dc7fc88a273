"""Regrouping one latent block: its new query, ``kv_b_proj`` and ``o_proj`` (and a per-head gate's rows, when
the heads move) for ``num_groups`` groups, float64, in the family's own layout (see mla.py for the math)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConversionError
from .common import as_float64
from .grouping import GroupingCost, group_basis, psd_sqrt, similarity_grouping, sqrt_pair, weighted
from .latent_blocks import LatentBlock
from .latent_statistics import query_linear

__all__ = ["convert_layer"]


def _grouping(block: LatentBlock, targets: list[torch.Tensor], ranks: list[int], num_groups: int,
              grouping: str) -> tuple[list[list[int]], float, float]:
    """The heads of each group, the grouping's calibration residual and the neighbour grouping's; refused when
    the heads move and the block's per-head gate cannot move with them."""
    d = block.dims
    m = d.n_h // num_groups
    if grouping == "similarity" and 1 < num_groups < d.n_h:
        groups, cost, neighbour_cost = similarity_grouping(targets, ranks, num_groups)
    else:
        groups = [list(range(g * m, (g + 1) * m)) for g in range(num_groups)]
        cost = neighbour_cost = GroupingCost(targets, ranks).total(groups) if num_groups < d.n_h else 0.0
    reordered = [h for g in groups for h in g] != list(range(d.n_h))
    if block.has_output_gate and reordered and block.output_gate_projection is None:
        raise ConversionError(
            f"{block.path}: similarity grouping re-orders the heads, but the block's per-head output gate is not "
            "computed by one projection whose rows are the heads in order, so it cannot be re-ordered with them; "
            "use grouping='neighbour'"
        )
    return groups, cost, neighbour_cost


def _group_bases(groups: list[list[int]], whitened: list[torch.Tensor], inv_sqrt_c: torch.Tensor,
                 lefts: list[torch.Tensor | None]) -> tuple[torch.Tensor, list[torch.Tensor], list[list[float]]]:
    """Per group, the shared up-projections of keys and values (kv_b_proj's rows, repeated for the group's
    heads); per kind (keys, values), the head maps in the new head order [n_h, d, d] and each group's kept
    energy."""
    kv_b, maps, kept = [], [[], []], [[], []]
    for heads in groups:
        index = torch.tensor(heads)
        bases = []
        for kind, (x, left) in enumerate(zip(whitened, lefts)):
            basis, head_maps, share = group_basis(x[index], inv_sqrt_c, None if left is None else left[index])
            bases.append(basis)
            maps[kind].append(head_maps)
            kept[kind].append(share)
        kv_b.append(torch.cat(bases).repeat(len(heads), 1))
    return torch.cat(kv_b), [torch.cat(m) for m in maps], kept


def _query_and_gate(block: LatentBlock, key_maps: torch.Tensor, perm: torch.Tensor,
                    reordered: bool) -> dict[str, torch.Tensor]:
    """The query's rows in the new head order, A_j^T folded into head j's no-RoPE rows (the bias as a column of
    the same map); and, when the heads moved, the per-head gate's rows with them."""
    attn, d = block.module, block.dims
    q_linear = query_linear(attn)
    q_name = "q_proj" if q_linear is getattr(attn, "q_proj", None) else "q_b_proj"
    tensors = {}
    for kind, value in (("weight", q_linear.weight), ("bias", q_linear.bias)):
        if value is not None:
            rows = as_float64(value).view(d.n_h, d.d_qk, -1)[perm]
            new_q = torch.cat([key_maps.transpose(1, 2) @ rows[:, : d.d_n], rows[:, d.d_n :]], dim=1)
            tensors[f"{q_name}.{kind}"] = new_q.reshape(value.shape)
    if block.has_output_gate and reordered:  # the gate's rows follow their heads
        gate = attn.get_submodule(block.output_gate_projection)
        for kind, value in (("weight", gate.weight), ("bias", gate.bias)):
            if value is not None:
                rows = as_float64(value).reshape(d.n_h, block.output_gate_width, -1)[perm]
                tensors[f"{block.output_gate_projection}.{kind}"] = rows.reshape(value.shape)
    return tensors


def convert_layer(
    block: LatentBlock,
    latent_moment: torch.Tensor,
    query_moment: torch.Tensor | None,
    num_groups: int,
    grouping: str,
    score_aware: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The new attention tensors of one block (float64, by name below the block) and its record.

    In the family's own layout, same names and shapes: ``kv_b_proj`` holds each group's shared up-projection
    once per head of the group, the query's RoPE rows stay where the family has them (only re-indexed with
    the heads), the down-projection is untouched. ``compact.compact_layout`` turns them into GqlaForCausalLM's.
    """
    d = block.dims
    sqrt_c, inv_sqrt_c = sqrt_pair(latent_moment)
    x_key, x_value = block.key_up @ sqrt_c, block.value_up @ sqrt_c  # [n_h, d, d_c]
    o_weight = as_float64(block.module.o_proj.weight)  # [D, n_h d_v]
    o_heads = o_weight.view(-1, d.n_h, d.d_v).permute(1, 0, 2)  # [n_h, D, d_v]
    left_key = left_value = None
    if score_aware:
        left_key = psd_sqrt(query_moment)
        left_value = psd_sqrt(o_heads.transpose(1, 2) @ o_heads)
    targets = [weighted(x_key, left_key), weighted(x_value, left_value)]
    groups, cost, neighbour_cost = _grouping(block, targets, [d.d_n, d.d_v], num_groups, grouping)
    permutation = [h for g in groups for h in g]
    perm = torch.tensor(permutation)
    kv_b, (key_maps, value_maps), (kept_k, kept_v) = _group_bases(groups, [x_key, x_value], inv_sqrt_c,
                                                                  [left_key, left_value])
    tensors = _query_and_gate(block, key_maps, perm, reordered=permutation != list(range(d.n_h)))
    tensors["kv_b_proj.weight"] = kv_b
    tensors["o_proj.weight"] = (o_heads[perm] @ value_maps).permute(1, 0, 2).reshape(o_weight.shape[0], -1)
    record = {
        "groups": groups,
        "key_kept_energy": sum(kept_k) / len(kept_k),
        "value_kept_energy": sum(kept_v) / len(kept_v),
        "grouping_residual": cost,
        "neighbour_grouping_residual": neighbour_cost,
    }
    return tensors, record
