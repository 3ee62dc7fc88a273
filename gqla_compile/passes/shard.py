"""Tensor parallel: cut one layer's rewritten attention down to what rank r of P holds (Megatron style).

Heads are split into P contiguous blocks; rank r keeps query heads [r n_h / P, (r + 1) n_h / P).

What a rank caches, and which P a layer can be split over, is its path's (``DecodePath.rank_dims``,
``shard_problem``); for the two paths:

- grouped path: groups [r n_g / P, (r + 1) n_g / P) with exactly those heads; the rank keeps their rows
  of the query projection, their rows of the stacked up-projection W_UKV, their columns of o_proj, and
  caches only its groups' keys and values: with the RoPE key copied into each group's key it shards with its
  groups (1/P of the cache); with the shared layout every rank keeps k_R once beside its groups
  (n_g / P (d_n + d_v) + d_R per token). P must divide n_g.
- absorbed path: the rank's heads with their W_UK (applied to the query) and W_UV (per-group bmm or folded
  into o_proj, the rank's columns only); the latent down-projection is replicated and every rank caches
  the whole latent [c ; k_R]. P must divide n_h.

Each rank's o_proj then gives a partial sum of the output; ``all_reduce`` (``torch.distributed.
_functional_collectives``, traceable, so Inductor sees it) sums them and o_proj's bias is added once,
after the sum (see runtime.LatentAttentionCore). Everything outside attention (embeddings, MLP, norms,
lm_head) stays replicated: every rank computes it on the same inputs.

The pass works on the latent projection graph (split's output; the path's tail, absorb or expand, is then
built from the rank's slices): it slices the query projection's weight rows in the graph where the
graph's reshapes allow it, checks the sliced graph against the whole one on the recorded call, and falls
back to narrowing the query after the full projection (correct, but the query projection replicated) if
the check fails; the record says which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import fx

from ..capture import recorded_inputs
from ..dims import LatentDims
from ..paths import DecodePath
from .summaries import ShardSummary
from .graph import LINEAR_OPS, RESHAPE_OPS, ancestors, append_to_graph, optional_output_count, tensor_meta

REPLICATED = {
    "embeddings": "replicated",
    "mlp": "replicated",
    "norms": "replicated",
    "lm_head": "replicated",
    "latent_down_projection": "replicated (every rank needs the whole latent)",
}


@dataclass(frozen=True)
class TensorParallelLayout:
    """Which heads and groups rank ``rank`` of ``tp`` holds for one layer of ``dims`` on ``path``, whose cache has
    the RoPE-key layout ``rope_key`` (the plan's)."""

    path: DecodePath
    dims: LatentDims  # the whole layer's dims
    tp: int
    rank: int
    rope_key: str = "copied"

    def __post_init__(self) -> None:
        problem = self.path.shard_problem(self.dims, self.tp)
        if problem:
            raise ValueError(problem)
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} is outside tp={self.tp}")

    @property
    def heads(self) -> tuple[int, int]:
        per_rank = self.dims.n_h // self.tp
        return self.rank * per_rank, (self.rank + 1) * per_rank

    @property
    def head_groups(self) -> tuple[int, int, int] | None:
        """(first group, end group, heads per group) when the rank's heads are whole groups, else None."""
        h0, h1 = self.heads
        per_group = self.dims.heads_per_group
        if h0 % per_group == 0 and h1 % per_group == 0:
            return h0 // per_group, h1 // per_group, per_group
        return None

    @property
    def local_dims(self) -> LatentDims:
        """The dims of the rank's part: its heads, and its groups (on the absorbed path, the groups its
        heads use; a rank holding part of a group carries that group's up-projection per head)."""
        h0, h1 = self.heads
        groups = self.head_groups
        n_g = groups[1] - groups[0] if groups else h1 - h0
        return replace(self.dims, n_h=h1 - h0, n_g=n_g)

    def up_projections(self, w_uk: torch.Tensor, w_uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [n_g, d_n, d_c] and W_UV [n_g, d_v, d_c] -> the rank's groups (or heads, see local_dims)."""
        groups = self.head_groups
        if groups:
            g0, g1, _ = groups
            return w_uk[g0:g1].contiguous(), w_uv[g0:g1].contiguous()
        h0, h1 = self.heads
        per_group = self.dims.heads_per_group
        return (w_uk.repeat_interleave(per_group, 0)[h0:h1].contiguous(),
                w_uv.repeat_interleave(per_group, 0)[h0:h1].contiguous())

    def output_columns(self, weight: torch.Tensor, per_head: int) -> torch.Tensor:
        """o_proj (or folded o_proj) weight [D, n_h per_head] -> the rank's heads' columns."""
        h0, h1 = self.heads
        return weight[:, h0 * per_head : h1 * per_head].contiguous()

    def cache_elements(self) -> int:
        """Cached elements per token on this rank (the path's per-rank cache, in the layout's RoPE-key layout)."""
        return self.path.rank_cache_elements(self.dims, self.tp, rope_key=self.rope_key)


def narrow_heads(query, latent, rope_key, *, start: int, end: int):
    """Keep the rank's query heads: query [B, n_h, T, d] -> [B, end - start, T, d]."""
    return query[:, start:end], latent, rope_key


def slice_query_projection(gm: fx.GraphModule, dims: LatentDims, start: int, end: int) -> fx.GraphModule | None:
    """A copy of ``gm`` whose query projection computes only heads [start, end), or None if the graph's
    query path is not one head-major linear followed by reshapes that can be told the new head count."""
    graph = fx.Graph()
    outputs = graph.graph_copy(gm.graph, {})
    graph.output(outputs)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    query_out, *rest = outputs
    others = set()
    for out in rest:
        others |= ancestors(out) | {out}
    query_side = (ancestors(query_out) | {query_out}) - others
    rows = dims.n_h * dims.d_qk
    linears = [n for n in query_side if n.op == "call_function" and n.target in LINEAR_OPS
               and n.args[1].op == "get_attr" and tuple(getattr(new, n.args[1].target).shape)[0] == rows]
    if len(linears) != 1:
        return None
    (linear,) = linears
    for index in (1, 2):
        if len(linear.args) > index and linear.args[index] is not None:
            node = linear.args[index]
            if node.op != "get_attr":
                return None
            tensor = getattr(new, node.target)
            sliced = tensor[start * dims.d_qk : end * dims.d_qk].contiguous()
            name = f"{node.target}_tp_shard"
            new.register_buffer(name, sliced, persistent=False)
            old, node.target = node.target, name
            if not any(n.op == "get_attr" and n.target == old for n in new.graph.nodes):
                delattr(new, old)  # the rank holds only its rows
    downstream = _descendants(linear) & (ancestors(query_out) | {query_out})
    for node in downstream:
        if node.op != "call_function" or node.target not in RESHAPE_OPS:
            continue
        meta = tensor_meta(node)
        shape = list(node.args[1])
        sizes = [s if isinstance(s, int) else None for s in meta.shape] if meta is not None else None
        if sizes is None or len(sizes) != len(shape):
            return None
        head_positions = [i for i, s in enumerate(sizes) if s == dims.n_h]
        if len(head_positions) > 1:
            return None
        for i in head_positions:
            if isinstance(shape[i], int) and shape[i] == dims.n_h:
                shape[i] = end - start
        node.args = (node.args[0], shape, *node.args[2:])
    new.graph.eliminate_dead_code()
    new.recompile()
    for name in list(new._buffers):
        new._non_persistent_buffers_set.add(name)
    return new


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


class ShardAttention:
    """Pass: rank r's part of the latent projection (its query heads); records the whole layer's split.

    The rank's slices of the up-projections and o_proj (``layout.up_projections``, ``output_columns``)
    are taken by the pipeline for the path's tail and the attention core; they are listed here so the
    record shows every weight that was sharded, and what stayed replicated.
    """

    name = "shard"

    def __init__(self, layout: TensorParallelLayout, capture=None, *, backend: str = "", gates: int = 0):
        self.layout = layout
        self.capture = capture
        self.backend = backend
        self.gates = gates  # output gates among the optional outputs (split.py); the rest feed a token selection
        self.sharded_weights: dict[str, list[int]] = {}
        self.query_projection = ""

    def shard_weights(self, up, o_weight: torch.Tensor):
        """The rank's part of the up-projections (detect.UpProjections) and of o_proj's weight."""
        key, value = self.layout.up_projections(up.key, up.value)
        o_weight = self.layout.output_columns(o_weight, self.layout.dims.d_v)
        self.sharded_weights.update({"w_uk (rank's groups)": list(key.shape), "w_uv (rank's groups)": list(value.shape),
                                     "o_proj (rank's head columns)": list(o_weight.shape)})
        return replace(up, key=key, value=value), o_weight

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        start, end = self.layout.heads
        if optional_output_count(gm):
            # An output gate [B, T, n_h, g] keeps the rank's heads; a token selection's inputs stay whole (every
            # rank selects the same tokens, for its own heads).
            self.query_projection = "replicated, query and output gate narrowed to the rank's heads after it"
            gates = self.gates
            return append_to_graph(
                gm, lambda q, c, k, *optional: (*narrow_heads(q, c, k, start=start, end=end),
                                                *(g[:, :, start:end] for g in optional[:gates]), *optional[gates:]),
                {}, class_name=type(gm).__name__)
        sliced = slice_query_projection(gm, self.layout.dims, start, end)
        if sliced is not None and self._agrees(gm, sliced, start, end):
            self.query_projection = "rows of the rank's heads"
            for name, tensor in sliced.named_buffers():
                if name.endswith("_tp_shard"):
                    self.sharded_weights[f"{name.removesuffix('_tp_shard')} (rank's head rows)"] = list(tensor.shape)
            return sliced
        self.query_projection = "replicated, query narrowed to the rank's heads after it"
        return append_to_graph(gm, lambda q, c, k: narrow_heads(q, c, k, start=start, end=end), {},
                               class_name=type(gm).__name__)

    def _agrees(self, whole: fx.GraphModule, sliced: fx.GraphModule, start: int, end: int) -> bool:
        if self.capture is None:
            return False
        try:
            inputs = recorded_inputs(self.capture)
            with torch.no_grad():
                expected = whole(*inputs)[0][:, start:end]
                got = sliced(*inputs)[0]
        except Exception:  # noqa: BLE001 - a graph we cannot re-size falls back to narrowing
            return False
        return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)

    def summary(self) -> ShardSummary:
        layout = self.layout
        groups = layout.head_groups
        return ShardSummary(
            tp=layout.tp,
            rank=layout.rank,
            backend=self.backend,
            path=layout.path.name,
            heads=list(layout.heads),
            groups=[groups[0], groups[1]] if groups else None,
            query_projection=self.query_projection,
            sharded_weights=dict(self.sharded_weights),
            replicated=dict(REPLICATED),
            collective="all_reduce(sum) after o_proj (torch.distributed._functional_collectives)",
            o_proj_bias="added once, after the all-reduce",
            cache_elements_per_token_per_rank=layout.cache_elements(),
            cache=layout.path.shards_by,
        )
