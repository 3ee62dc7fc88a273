"""The grouped-GQA path: expand only the new tokens' latents into per-group keys and values.

The cache then holds K_g = [W_UK^g c ; k_R] and V_g = W_UV^g c for n_g groups (the RoPE key copied into
each group's key so a stock GQA attention reads contiguous keys), and nothing re-expands the context.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import fx

from .graph import append_to_graph, optional_output_count


def expand_new_tokens(query, latent, rope_key, w_ukv, *, n_g: int, d_n: int, d_v: int):
    """query [B, n_h, T, d_n + d_R], latent [B, T, d_c], rope_key [B, T, d_R], W_UKV [n_g (d_n + d_v), d_c]
    -> (query, keys [B, n_g, T, d_n + d_R], values [B, n_g, T, d_v])."""
    kv = F.linear(latent, w_ukv).unflatten(-1, (n_g, d_n + d_v)).transpose(1, 2)
    k_nope, values = kv[..., :d_n], kv[..., d_n:]
    k_rope = rope_key.unsqueeze(1).expand(-1, n_g, -1, -1)
    return query, torch.cat([k_nope, k_rope], dim=-1), values.contiguous()


def expand_latent_attention(projection: fx.GraphModule, w_ukv: torch.Tensor, *, n_g: int, d_n: int) -> fx.GraphModule:
    """Append the new-token expansion to a latent projection graph (outputs: query, keys, values)."""
    d_v = w_ukv.shape[0] // n_g - d_n
    tail = functools.partial(expand_new_tokens, n_g=n_g, d_n=d_n, d_v=d_v)
    return append_to_graph(projection, tail, {"w_ukv": w_ukv}, class_name="GroupedProjection",
                           passthrough=optional_output_count(projection))


class ExpandNewTokens:
    """Pass: the grouped path's projection (per-group K/V of the new tokens only)."""

    name = "expand"

    def __init__(self, w_ukv: torch.Tensor, *, n_g: int, d_n: int):
        self.w_ukv, self.n_g, self.d_n = w_ukv, n_g, d_n

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return expand_latent_attention(gm, self.w_ukv, n_g=self.n_g, d_n=self.d_n)

    def summary(self) -> dict:
        return {"folded_weights": {"w_ukv (W_UK^g ; W_UV^g stacked per group)": list(self.w_ukv.shape)}, "n_g": self.n_g}
