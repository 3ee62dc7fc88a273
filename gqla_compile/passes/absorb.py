"""The absorbed-MQA path's tail: the new tokens' cache entry [c ; k_R], the query handed on as it is.

The cache entry per token is the latent and the RoPE key, d_c + d_R values shared by all heads. W_UK^g is not
applied here: it moves the query into latent space inside the attention core (``runtime.absorb_query``, one
batched matmul per group, the report's "bmm"), in the calls that read the latent (the absorbed compute form,
every decode step); a call with many new tokens expands the keys instead and needs the query's no-RoPE part as
it is (``paths.AbsorbedPath.compute_forms``). The tail hands the core [q_n ; q_R], which both forms start from.
"""

from __future__ import annotations

import torch
from torch import fx

from ..dims import QUERY_ABSORPTION
from .graph import append_to_graph, optional_output_count
from .summaries import AbsorbSummary


def latent_key(query, latent, rope_key):
    """query [B, n_h, T, d_n + d_R], latent [B, T, d_c], rope_key [B, T, d_R] -> (query, key [B, 1, T, d_c + d_R],
    value [B, 1, T, 0]).

    The value is zero-width: the attention core reads the latent part of the key as its values, so the
    cache holds d_c + d_R elements per token. Plain PyTorch, traced onto the graph.
    """
    key = torch.cat([latent, rope_key], dim=-1).unsqueeze(1)
    return query, key, key[..., :0]


def absorb_latent_attention(projection: fx.GraphModule) -> fx.GraphModule:
    """Append the latent cache entry to a latent projection graph (outputs: query, key, zero-width value)."""
    return append_to_graph(projection, latent_key, {}, class_name="AbsorbedProjection",
                           passthrough=optional_output_count(projection))


class AbsorbQuery:
    """Pass: the absorbed path's projection ([c ; k_R] cache entry; the query for the core's compute forms).

    The weights the core folds in (W_UK on the query, W_UV per group after attention or folded into o_proj: the
    plan's choice; W_UK and W_UV stacked for the expanded form) are recorded here.
    """

    name = "absorb"

    def __init__(self, w_uk: torch.Tensor, output_absorption: str, value_side: dict[str, torch.Tensor]):
        self.w_uk, self.output_absorption, self.value_side = w_uk, output_absorption, value_side

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return absorb_latent_attention(gm)

    def summary(self) -> AbsorbSummary:
        weights = {"w_uk (W_UK^g per group, applied to the query)": list(self.w_uk.shape)}
        weights.update({name: list(tensor.shape) for name, tensor in self.value_side.items()})
        return AbsorbSummary(query_absorption=QUERY_ABSORPTION, output_absorption=self.output_absorption,
                             folded_weights=weights)
