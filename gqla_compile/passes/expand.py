"""The grouped-GQA path: expand only the new tokens' latents into per-group keys and values.

The cache then holds K_g = W_UK^g c and V_g = W_UV^g c for n_g groups, and the RoPE key k_R either copied into
each group's key (a stock GQA layout) or kept once beside them (``rope_key="shared"``, paths.GroupedPath);
nothing re-expands the context.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import fx

from .graph import append_to_graph, optional_output_count
from .summaries import ExpandSummary


def expand_new_tokens(query, latent, rope_key, w_ukv, *, n_g: int, d_n: int, d_v: int, shared_rope_key: bool = False):
    """query [B, n_h, T, d_n + d_R], latent [B, T, d_c], rope_key [B, T, d_R], W_UKV [n_g (d_n + d_v), d_c]
    -> (query, keys, values).

    RoPE key copied: keys [B, n_g, T, d_n + d_R], values [B, n_g, T, d_v] (a stock GQA layout). Shared: one
    cache head holding every group, keys [B, 1, T, n_g d_n + d_R] (the groups' no-RoPE keys, then k_R once)
    and values [B, 1, T, n_g d_v]; the attention core reads them back as per-group views.
    """
    kv = F.linear(latent, w_ukv).unflatten(-1, (n_g, d_n + d_v))  # [B, T, n_g, d_n + d_v]
    if shared_rope_key:
        keys = torch.cat([kv[..., :d_n].flatten(-2), rope_key], dim=-1).unsqueeze(1)
        return query, keys, kv[..., d_n:].flatten(-2).unsqueeze(1)
    kv = kv.transpose(1, 2)
    k_nope, values = kv[..., :d_n], kv[..., d_n:]
    k_rope = rope_key.unsqueeze(1).expand(-1, n_g, -1, -1)
    return query, torch.cat([k_nope, k_rope], dim=-1), values.contiguous()


def expand_latent_attention(projection: fx.GraphModule, w_ukv: torch.Tensor, *, n_g: int, d_n: int,
                            shared_rope_key: bool = False) -> fx.GraphModule:
    """Append the new-token expansion to a latent projection graph (outputs: query, keys, values)."""
    d_v = w_ukv.shape[0] // n_g - d_n
    tail = functools.partial(expand_new_tokens, n_g=n_g, d_n=d_n, d_v=d_v, shared_rope_key=shared_rope_key)
    return append_to_graph(projection, tail, {"w_ukv": w_ukv}, class_name="GroupedProjection",
                           passthrough=optional_output_count(projection))


class ExpandNewTokens:
    """Pass: the grouped path's projection (per-group K/V of the new tokens only)."""

    name = "expand"

    def __init__(self, w_ukv: torch.Tensor, *, n_g: int, d_n: int, rope_key: str = "copied"):
        self.w_ukv, self.n_g, self.d_n, self.rope_key = w_ukv, n_g, d_n, rope_key

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return expand_latent_attention(gm, self.w_ukv, n_g=self.n_g, d_n=self.d_n,
                                       shared_rope_key=self.rope_key == "shared")

    def summary(self) -> ExpandSummary:
        return ExpandSummary(folded_weights={"w_ukv (W_UK^g ; W_UV^g stacked per group)": list(self.w_ukv.shape)},
                             n_g=self.n_g, rope_key=self.rope_key)
