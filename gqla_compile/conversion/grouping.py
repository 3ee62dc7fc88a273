"""The per-group PCA of regrouping, and which heads form a group.

Per group of heads, in the calibration metric C = E[c c^T] of the latent: the shared up-projection and the
head maps (:func:`group_basis`); and the grouping of least calibration residual (:func:`similarity_grouping`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .calibration import MOMENT_DAMPING

__all__ = ["sqrt_pair", "psd_sqrt", "group_basis", "weighted", "GroupingCost", "similarity_grouping"]

# Rounds of pairwise swaps in similarity grouping: each round tries every swap; it stops early once none helps.
_SWAP_PASSES = 4


def sqrt_pair(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C^{1/2} and C^{-1/2} of the damped C (one eigendecomposition, so they are exact inverses)."""
    ridge = MOMENT_DAMPING * max(float(moment.diagonal().mean()), 1e-300)
    eigvals, eigvecs = torch.linalg.eigh(moment + ridge * torch.eye(moment.shape[0], dtype=moment.dtype))
    eigvals = eigvals.clamp_min(ridge)
    return (eigvecs * eigvals.sqrt()) @ eigvecs.T, (eigvecs * eigvals.rsqrt()) @ eigvecs.T


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a (batch of) PSD matrices, damped like C."""
    ridge = MOMENT_DAMPING * matrix.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    eigvals, eigvecs = torch.linalg.eigh(matrix + ridge[..., None, None] * eye)
    return (eigvecs * eigvals.clamp_min(0).sqrt()[..., None, :]) @ eigvecs.transpose(-1, -2)


def group_basis(
    whitened: torch.Tensor, inv_sqrt: torch.Tensor, left: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Shared up-projection and head maps of one group.

    Args:
        whitened: X_h = W^h C^{1/2} of the group's heads [m, d, d_c].
        inv_sqrt: C^{-1/2} [d_c, d_c].
        left: optional per-head left weights L_h [m, d, d] (the PCA then keeps what L_h X_h needs most).

    Returns W^G [d, d_c], the head maps A [m, d, d] with A_h W^G = X_h V V^T C^{-1/2}, and the share of the
    (weighted) energy kept.
    """
    m, d, d_c = whitened.shape
    target = whitened if left is None else left @ whitened
    _, s, vh = torch.linalg.svd(target.reshape(m * d, d_c), full_matrices=False)
    k = min(d, vh.shape[0])
    v = vh[:k].T  # [d_c, k]
    s = s[:k]
    sigma = torch.where(s > 1e-12 * s[0].clamp_min(1e-300), s / math.sqrt(m), torch.ones_like(s))
    basis = torch.zeros(d, d_c, dtype=whitened.dtype)
    maps = torch.zeros(m, d, d, dtype=whitened.dtype)
    basis[:k] = sigma[:, None] * (v.T @ inv_sqrt)
    maps[:, :, :k] = (whitened @ v) / sigma
    total = float(target.square().sum())
    kept = float(s.square().sum()) / total if total > 0 else 1.0
    return basis, maps, kept


def weighted(whitened: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
    """Per head L_h X_h [n, d, d_c]: what the grouping's PCA has to keep."""
    return whitened if left is None else left @ whitened


def _residual(stacked: torch.Tensor, d: int) -> float:
    """Energy of ``stacked`` [rows, d_c] outside its top-d principal directions.

    The eigenvalues come from the smaller of the two Gram matrices (rows x rows or d_c x d_c): their
    non-zero eigenvalues are the same, and a group of a few heads has far fewer rows than latent dims.
    """
    gram = stacked @ stacked.T if stacked.shape[0] < stacked.shape[1] else stacked.T @ stacked
    eigvals = torch.linalg.eigvalsh(gram)
    return float(eigvals[:-d].clamp_min(0).sum()) if d < eigvals.numel() else 0.0


class GroupingCost:
    """Calibration residual of a grouping: per kind (keys, values), the energy PCA loses, relative to the total."""

    def __init__(self, targets: Sequence[torch.Tensor], ranks: Sequence[int]):
        self.targets, self.ranks = targets, ranks
        self.energies = [t.square().sum((1, 2)) for t in targets]  # per head
        self.totals = [float(e.sum()) or 1.0 for e in self.energies]
        self.cache: dict[frozenset, float] = {}

    def group(self, heads) -> float:
        key = frozenset(heads)
        if key not in self.cache:
            index = torch.tensor(sorted(key))
            self.cache[key] = sum(_residual(t[index].reshape(-1, t.shape[-1]), d) / total
                                  for t, d, total in zip(self.targets, self.ranks, self.totals))
        return self.cache[key]

    def total(self, groups) -> float:
        return sum(self.group(g) for g in groups)


def similarity_grouping(targets: Sequence[torch.Tensor], ranks: Sequence[int], num_groups: int) -> tuple[list[list[int]], float, float]:
    """Equal-size groups of heads whose subspaces share one basis best: (groups, cost, neighbour cost).

    ``targets``: per kind (keys, values) the heads' weighted whitened up-projections [n_h, d, d_c]; ``ranks``:
    the basis size of each kind. Greedy construction (seed: the unassigned head of most energy; then the head
    that adds the least residual), then pairwise swaps between groups while they lower the residual, started
    from the greedy and from the neighbour grouping; the better result is kept.
    """
    n_h = targets[0].shape[0]
    m = n_h // num_groups
    cost = GroupingCost(targets, ranks)
    neighbour = [list(range(g * m, (g + 1) * m)) for g in range(num_groups)]
    energy = sum(e / t for e, t in zip(cost.energies, cost.totals))
    unassigned = set(range(n_h))
    greedy = []
    for _ in range(num_groups):
        group = [max(unassigned, key=lambda h: (float(energy[h]), -h))]
        unassigned.discard(group[0])
        while len(group) < m:
            best = min(unassigned, key=lambda h: (cost.group(group + [h]), h))
            group.append(best)
            unassigned.discard(best)
        greedy.append(group)
    results = [_swap_search(start, cost) for start in (greedy, neighbour)]
    groups = min(results, key=cost.total)
    groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
    return groups, cost.total(groups), cost.total(neighbour)


def _swap_search(groups: list[list[int]], cost: GroupingCost) -> list[list[int]]:
    groups = [list(g) for g in groups]
    if len(groups) < 2:
        return groups
    for _ in range(_SWAP_PASSES):
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                for i in range(len(groups[a])):
                    for j in range(len(groups[b])):
                        before = cost.group(groups[a]) + cost.group(groups[b])
                        ga, gb = list(groups[a]), list(groups[b])
                        ga[i], gb[j] = gb[j], ga[i]
                        if cost.group(ga) + cost.group(gb) < before - 1e-12 * max(before, 1e-300):
                            groups[a], groups[b] = ga, gb
                            improved = True
        if not improved:
            break
    return groups
