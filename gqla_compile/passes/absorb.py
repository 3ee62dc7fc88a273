"""The absorbed-MQA path: the query moves into latent space; every head attends over [c ; k_R].

W_UK^g is applied to the query as one batched matmul per group (the report records this as "bmm"); the
cache entry per token is the latent and the RoPE key, d_c + d_R values shared by all heads.
"""

from __future__ import annotations

import functools

import torch
from torch import fx

from ..paths import QUERY_ABSORPTION
from .graph import append_to_graph, optional_output_count


def absorb_query(query, latent, rope_key, w_uk, *, d_n: int, n_g: int):
    """query [B, n_h, T, d_n + d_R], latent [B, T, d_c], rope_key [B, T, d_R], W_UK [n_g, d_n, d_c] ->
    (query in latent space [B, n_h, T, d_c + d_R], key [B, 1, T, d_c + d_R], value [B, 1, T, 0]).

    The value is zero-width: the attention core reads the latent part of the key as its values, so the
    cache holds d_c + d_R elements per token.

    Plain PyTorch: it runs eagerly and is also traced onto the graph (dims are passed in because FX
    proxies have no concrete shapes).
    """
    q_nope, q_rope = query[..., :d_n], query[..., d_n:]
    q_latent = torch.matmul(q_nope.unflatten(1, (n_g, -1)), w_uk.unsqueeze(1)).flatten(1, 2)
    key = torch.cat([latent, rope_key], dim=-1).unsqueeze(1)
    return torch.cat([q_latent, q_rope], dim=-1), key, key[..., :0]


def absorb_latent_attention(projection: fx.GraphModule, w_uk: torch.Tensor) -> fx.GraphModule:
    """Append the query absorption to a latent projection graph (outputs: query, key, zero-width value)."""
    n_g, d_n, _ = w_uk.shape
    tail = functools.partial(absorb_query, d_n=d_n, n_g=n_g)
    return append_to_graph(projection, tail, {"w_uk": w_uk}, class_name="AbsorbedProjection",
                           passthrough=optional_output_count(projection))


class AbsorbQuery:
    """Pass: the absorbed path's projection (query into latent space, [c ; k_R] cache entry).

    The value side (W_UV per group after attention, or folded into o_proj: the plan's choice, applied
    by runtime.LatentAttentionCore) is recorded here with the other folded weights.
    """

    name = "absorb"

    def __init__(self, w_uk: torch.Tensor, output_absorption: str, value_side: dict[str, torch.Tensor]):
        self.w_uk, self.output_absorption, self.value_side = w_uk, output_absorption, value_side

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return absorb_latent_attention(gm, self.w_uk)

    def summary(self) -> dict:
        weights = {"w_uk (W_UK^g per group, applied to the query)": list(self.w_uk.shape)}
        weights.update({name: list(tensor.shape) for name, tensor in self.value_side.items()})
        return {
            "query_absorption": QUERY_ABSORPTION,
            "output_absorption": self.output_absorption,
            "folded_weights": weights,
        }
