"""Fold the latent up-projections into neighbouring weights, once, at compile time (DESIGN.md section 2).

W_O~^h = W_O,h W_UV^{g(h)} (D x d_c per head) lets the absorbed path skip the value up-projection; the
grouped path instead stacks W_UK^g and W_UV^g into one [n_g (d_n + d_v), d_c] matrix that expands only the
new tokens' latents.
"""

from __future__ import annotations

import torch

from ..errors import ShapeMismatchError


def fold_value_up_projection(w_o: torch.Tensor, w_uv: torch.Tensor, n_h: int, *, layer: str = "") -> torch.Tensor:
    """o_proj weight [D, n_h d_v] and W_UV [n_g, d_v, d_c] -> folded [D, n_h d_c]."""
    n_g, d_v, d_c = w_uv.shape
    if w_o.shape[1] != n_h * d_v:
        raise ShapeMismatchError(
            f"{layer}: output projection takes {w_o.shape[1]} inputs, expected n_h * d_v = {n_h} * {d_v}"
        )
    per_head_uv = w_uv.repeat_interleave(n_h // n_g, dim=0)  # [n_h, d_v, d_c]
    per_head_o = w_o.unflatten(1, (n_h, d_v)).transpose(0, 1)  # [n_h, D, d_v]
    folded = torch.bmm(per_head_o.double(), per_head_uv.double())  # [n_h, D, d_c]
    return folded.transpose(0, 1).flatten(1).to(w_o.dtype).contiguous()


def stack_group_up_projections(w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """W_UK [n_g, d_n, d_c] and W_UV [n_g, d_v, d_c] -> one linear weight [n_g (d_n + d_v), d_c]."""
    return torch.cat([w_uk, w_uv], dim=1).flatten(0, 1).contiguous()
