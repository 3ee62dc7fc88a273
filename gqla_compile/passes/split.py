"""Cut a captured attention graph down to its latent projection: hidden -> (query, latent, rope key[, gate]).

Everything after that point (the per-step up-projection of the whole cache, the attention, o_proj) is what
the paths replace. The outputs are put into one canonical layout so both paths' tails are plain code:
query [B, n_h, T, d_n + d_R], latent [B, T, d_c], rope key [B, T, d_R]; an optional per-head output gate
(detect.py) is a fourth output [B, T, n_h], which the paths' tails pass through to the attention core.
"""

from __future__ import annotations

import torch
from torch import fx

from ..capture import CapturedAttention
from .context import LayerContext
from .detect import LatentAttentionMatch, batch_and_seq_symbols
from .graph import append_to_graph, extract_subgraph, tensor_meta


def split_latent_projection(
    capture: CapturedAttention, match: LatentAttentionMatch, parameters: dict[str, torch.Tensor]
) -> fx.GraphModule:
    """GraphModule(user inputs...) -> (query, latent, rope_key[, gate]), parameters as non-persistent buffers."""
    gm = capture.graph_module
    user = set(capture.user_placeholders)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in user]
    attributes = {
        n: (capture.parameter_inputs[n.name].replace(".", "_"), parameters[capture.parameter_inputs[n.name]])
        for n in gm.graph.nodes
        if n.op == "placeholder" and n.name in capture.parameter_inputs
    }
    gate = [match.output_gate] if match.output_gate is not None else []
    cut = extract_subgraph(gm, inputs, [match.query, match.latent, match.rope_key, *gate], attributes)
    batch_sym, seq_sym = batch_and_seq_symbols(capture)
    latent_dims = _token_layout(tensor_meta(match.latent), batch_sym, seq_sym)
    rope_dims = _token_layout(tensor_meta(match.rope_key), batch_sym, seq_sym)

    def canonical(query, latent, rope_key, *gate):
        pieces = tuple(g.flatten(2) for g in gate)  # [B, T, n_h, 1] -> [B, T, n_h]
        return query, to_token_layout(latent, *latent_dims), to_token_layout(rope_key, *rope_dims), *pieces

    return append_to_graph(cut, canonical, {}, class_name="LatentProjection")


def _token_layout(meta: torch.Tensor, batch_sym: str, seq_sym: str) -> tuple[tuple[int, ...], bool]:
    """Dims to drop (select index 0: size 1 or broadcast copies) and whether seq comes before batch."""
    names = [str(s) for s in meta.shape]
    batch_dim, seq_dim = names.index(batch_sym), names.index(seq_sym)
    drop = tuple(i for i in range(meta.dim() - 1) if i not in (batch_dim, seq_dim))
    return tuple(sorted(drop, reverse=True)), seq_dim < batch_dim


def to_token_layout(x: torch.Tensor, drop: tuple[int, ...], seq_first: bool) -> torch.Tensor:
    """[.., B, .., T, .., F] with broadcast or unit dims -> [B, T, F]."""
    for dim in drop:
        x = x.select(dim, 0)
    return x.transpose(0, 1) if seq_first else x


class SplitLatentProjection:
    """Pass: keep the latent projection, drop the whole-context expansion, attention and o_proj."""

    name = "split"

    def __init__(self, context: LayerContext):
        self.context = context
        self.removed: dict[str, bool] = {}

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        match = self.context.match
        out = split_latent_projection(self.context.capture, match, self.context.parameters)
        kept = {n.name for n in out.graph.nodes}
        self.removed = {
            "up_projection": match.up_projection.name not in kept,
            "attention": match.attention_output.name not in kept,
            "output_projection": match.output_projection.name not in kept,
        }
        return out

    def summary(self) -> dict:
        return {"removed": self.removed}
