"""Cut a captured attention graph down to its latent projection: hidden -> (query, latent, rope key[, gate]).

A block with a token selection (sparse attention, match.TokenSelectionMatch) is cut in two: the projection also
outputs the indexer's new index keys and the values the selection reads from the projection side; the
selection graph (the indexer's scoring and top-k, unchanged) runs after the index-key cache update.

Everything after that point (the per-step up-projection of the whole cache, the attention, o_proj) is what
the paths replace. The outputs are put into one canonical layout so both paths' tails are plain code:
query [B, n_h, T, d_n + d_R], latent [B, T, d_c], rope key [B, T, d_R]; an optional output gate (detect.py)
is a fourth output [B, T, n_h, 1 (per head) or d_v (per channel)], which the paths' tails pass through to the
attention core.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..capture import CapturedAttention
from .context import LayerContext
from .match import LatentAttentionMatch
from .probe import batch_and_seq_symbols
from .summaries import SplitSummary
from .graph import backward_closure, ancestors, append_to_graph, extract_subgraph, tensor_meta


def split_latent_projection(
    capture: CapturedAttention, match: LatentAttentionMatch, parameters: dict[str, torch.Tensor]
) -> fx.GraphModule:
    """GraphModule(user inputs...) -> (query, latent, rope_key[, gate]), parameters as non-persistent buffers."""
    gm = capture.graph_module
    user = set(capture.user_placeholders)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name in user]
    attributes = _parameter_attributes(capture, parameters)
    gate = [match.output_gate] if match.output_gate is not None else []
    selection = selection_feeds(capture, match).projection if match.selection is not None else []
    cut = extract_subgraph(gm, inputs, [match.query, match.latent, match.rope_key, *gate, *selection], attributes)
    batch_sym, seq_sym = batch_and_seq_symbols(capture)
    latent_dims = _token_layout(tensor_meta(match.latent), batch_sym, seq_sym)
    rope_dims = _token_layout(tensor_meta(match.rope_key), batch_sym, seq_sym)

    heads = match.dims.n_h

    def canonical(query, latent, rope_key, *optional):
        pieces = tuple(g.reshape(g.shape[0], g.shape[1], heads, -1) for g in optional[: len(gate)])  # [B, T, n_h, g]
        pieces += tuple(optional[len(gate):])  # the selection's inputs, as they are
        return query, to_token_layout(latent, *latent_dims), to_token_layout(rope_key, *rope_dims), *pieces

    return append_to_graph(cut, canonical, {}, class_name="LatentProjection")


def _parameter_attributes(capture: CapturedAttention, parameters: dict[str, torch.Tensor]) -> dict:
    gm = capture.graph_module
    return {
        n: (capture.parameter_inputs[n.name].replace(".", "_"), parameters[capture.parameter_inputs[n.name]])
        for n in gm.graph.nodes
        if n.op == "placeholder" and n.name in capture.parameter_inputs
    }


@dataclass
class SelectionFeeds:
    """What the selection graph takes: the projection's values it reads (``projection``; the index keys
    first, which the runtime passes through the indexer cache) and block inputs it reads directly
    (``arguments``: placeholders such as the full attention mask, fed uncut by the runtime)."""

    projection: list[fx.Node]
    arguments: list[fx.Node]


def selection_feeds(capture: CapturedAttention, match: LatentAttentionMatch) -> SelectionFeeds:
    """The cut between the projection graph and the selection graph."""
    selection = match.selection
    outputs = [selection.indices, *selection.returned.values()]
    index_key = [selection.index_key] if selection.index_key is not None else []
    needed = backward_closure(outputs, stop=set(index_key))
    gate = [match.output_gate] if match.output_gate is not None else []
    projected = set().union(*(ancestors(n) | {n} for n in (match.query, match.latent, match.rope_key, *gate)))
    computed = {n for n in needed if n.op != "placeholder" and n not in projected and n not in index_key}
    parameters = set(capture.parameter_inputs)
    feeds = [n for n in capture.graph_module.graph.nodes
             if n in needed and n not in computed and n not in index_key and n.name not in parameters
             and (n in outputs or any(u in computed for u in n.users))]
    from_projection = [n for n in feeds if n.op != "placeholder"]
    from_arguments = [n for n in feeds if n.op == "placeholder"]
    return SelectionFeeds(index_key + from_projection, from_arguments)


def split_token_selection(
    capture: CapturedAttention, match: LatentAttentionMatch, parameters: dict[str, torch.Tensor]
) -> tuple[fx.GraphModule, list[tuple[str, int | None]]]:
    """The selection graph: (index keys of every cached token, projection values, block inputs) -> (indices
    [B, T, k] as scattered into the mask, the indices the block returns...), and the block inputs it reads.
    For a stateful child's selection the graph ends in the child's tensor arguments instead.

    The top-k's width becomes ``min(k, number of index keys)``: the captured graph, traced without a cache,
    took the number of new tokens for the number of keys.
    """
    feeds = selection_feeds(capture, match)
    selection = match.selection
    # a stateful child (an indexer that reads the cache) is called by the runtime: the graph computes its inputs
    outputs = list(selection.source.args[0]) if selection.stateful else [selection.indices,
                                                                          *selection.returned.values()]
    sub = extract_subgraph(capture.graph_module, [*feeds.projection, *feeds.arguments], outputs,
                           _parameter_attributes(capture, parameters))
    if selection.topk is not None:
        topk = next(n for n in sub.graph.nodes if n.name == selection.topk.name)
        with sub.graph.inserting_before(topk):
            width = sub.graph.call_function(selection_width, (topk.args[0], selection.top_k))
        topk.args = (topk.args[0], width, *topk.args[2:])
        sub.graph.eliminate_dead_code()
        sub.recompile()
    placeholders = dict(zip(capture.user_placeholders, capture.user_inputs))
    return sub, [placeholders[n.name] for n in feeds.arguments]


def selection_width(scores: torch.Tensor, top_k: int) -> int:
    """How many tokens a top-k selection keeps: k, or every token when there are fewer."""
    return min(top_k, scores.shape[-1])


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

    def summary(self) -> SplitSummary:
        return SplitSummary(removed=dict(self.removed))
