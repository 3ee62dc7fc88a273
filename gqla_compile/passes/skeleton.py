"""The skeleton matcher: latent attention in a captured aten graph, found by its dataflow alone.

The skeleton, described once with its optional pieces (instead of one pattern per variant):

    attention(q, K, V)                  sdpa, or eager matmul -> [scale] -> [mask] [-> sink] -> softmax -> matmul
      sink: optional learned attention sink, a parameter [n_h] joined as one more score column before the
      softmax (minus its max, optionally) and dropped after it: it takes probability mass, adds no value
      V <- views <- linear(latent, W_UKV)                  the up-projection (grouped or per head)
      latent <- [norm] <- split/slice <- linear(x, W_DKV)   the down-projection
      K = merge(views of the same linear(latent, W_UKV), rope_key)
      rope_key: the only tensor that flows into K from W_DKV's output without passing W_UKV
    out = linear(views(attention) [* gate], W_O)           the output projection
      gate: optional, computed without the attention (e.g. sigmoid(g_proj(x))), one value per head and token
      [B, T, n_h, 1] or one per value channel [B, T, n_h, d_v] (or [B, T, n_h d_v], heads flattened)
    mask <- [scatter(top-k indices) into the mask]          optional token selection (selection.py)

Dims come from shapes; n_g is the up-projection's row count here, settled by the probes (probe.py).
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import replace

import torch
from torch import fx

from ..capture import CapturedAttention
from ..dims import LatentDims
from .graph import (
    LAYOUT_OPS,
    MATMUL_OPS,
    SDPA_OPS,
    SOFTMAX_OPS,
    ancestors,
    is_linear,
    tensor_meta,
    walk_back_through_layout,
    walk_forward_through_layout,
)
from .match import (
    ATTENTION_SINK_SHAPE,
    EAGER_ATTENTION_SHAPE,
    KEYS_NOT_FROM_LATENT,
    NO_ATTENTION,
    NO_DOWN_PROJECTION,
    OUTPUT_GATE_SHAPE,
    OUTPUT_NOT_PROJECTED,
    VALUES_NOT_PROJECTED,
    Detection,
    FailedMatch,
    LatentAttentionMatch,
    rope_key_count,
    shape_mismatch,
)
from .probe import batch_and_seq_symbols
from .selection import find_token_selection

__all__ = ["find_latent_attention", "gate_width"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def find_latent_attention(capture: CapturedAttention) -> Detection:
    """Match the skeleton at every attention site of a captured graph; the first match wins."""
    failures: list[FailedMatch] = []
    for site in _attention_sites(capture.graph_module):
        if isinstance(site, FailedMatch):
            failures.append(site)
            continue
        match = _match_site(capture, *site)
        if isinstance(match, FailedMatch):
            failures.append(match)
            continue
        return Detection(capture.module_path, match)
    return Detection(capture.module_path, None, failures or [NO_ATTENTION])


def _attention_sites(gm: fx.GraphModule):
    """(kind, q, k, v, output, scale, sink) for each attention in the graph, or a FailedMatch for a softmax
    that is not one (``sink``: the learned sink's parameter placeholder, or None)."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_OPS:
            q, k, v = node.args[:3]
            scale = node.kwargs.get("scale")
            if scale is None:
                scale = 1.0 / math.sqrt(tensor_meta(q).shape[-1])
            yield "sdpa", q, k, v, node, float(scale), None
        elif node.target in SOFTMAX_OPS:
            site = _eager_site(node)
            yield site if isinstance(site, FailedMatch) else ("eager", *site)


def _eager_site(softmax: fx.Node):
    """matmul(q, k^T) [* scale | / d] [+ mask] [-> cat(., sink) [- max]] -> softmax -> [cast/dropout/drop the
    sink column] -> matmul(p, v)."""
    scale = 1.0
    sink = None
    node = softmax.args[0]
    while node.op == "call_function" and node.target not in MATMUL_OPS:
        if node.target is aten.sub.Tensor and _is_row_max(node.args[1], node.args[0]):
            pass  # the softmax's own stabilisation (x - max x): the softmax is unchanged by it
        elif node.target is aten.cat.default and sink is None and scale == 1.0:
            sink = _sink_column(node)
            if sink is None:
                return ATTENTION_SINK_SHAPE
            node = node.args[0][0]  # the scores
            continue
        elif node.target in (aten.mul.Tensor, aten.mul.Scalar) and isinstance(node.args[1], (int, float)):
            scale *= float(node.args[1])
        elif node.target in (aten.div.Tensor, aten.div.Scalar) and isinstance(node.args[1], (int, float)):
            scale /= float(node.args[1])
        elif node.target not in (aten.add.Tensor, *LAYOUT_OPS):
            return EAGER_ATTENTION_SHAPE
        node = node.args[0]
    if node.op != "call_function" or node.target not in MATMUL_OPS:
        return EAGER_ATTENTION_SHAPE
    q, key_t = node.args[:2]
    if key_t.target not in (aten.transpose.int, aten.permute.default):
        return EAGER_ATTENTION_SHAPE
    consumer = _probability_consumer(softmax)
    if consumer is None:
        return EAGER_ATTENTION_SHAPE
    if sink is not None and not _drops_last_column(consumer.args[0], softmax):
        return ATTENTION_SINK_SHAPE
    return q, key_t.args[0], consumer.args[1], consumer, scale, sink


def _is_row_max(node, of: fx.Node) -> bool:
    """Whether ``node`` is the max of ``of`` over its last dim, kept (max.dim's values or amax)."""
    if not isinstance(node, fx.Node):
        return False
    if node.target is operator.getitem and node.args[1] == 0:
        node = node.args[0]
        return node.target is aten.max.dim and node.args[0] is of and node.args[1] in (-1, _last_dim(of))
    return node.target is aten.amax.default and node.args[0] is of


def _last_dim(node: fx.Node) -> int | None:
    meta = tensor_meta(node)
    return None if meta is None else meta.dim() - 1


def _sink_column(cat: fx.Node) -> fx.Node | None:
    """The learned sink behind ``cat([scores, sink expanded], -1)``: a 1-D placeholder (a parameter, one logit
    per head; _match_site checks it), or None when the join is anything else."""
    tensors, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if len(tensors) != 2 or dim not in (-1, _last_dim(cat)):
        return None
    column = walk_back_through_layout(tensors[1])
    meta = tensor_meta(column)
    if column.op != "placeholder" or meta is None or meta.dim() != 1:
        return None
    return column


def _drops_last_column(probabilities: fx.Node, softmax: fx.Node) -> bool:
    """Whether the probabilities reach the value matmul with the softmax's last column (the sink) sliced off."""
    node = probabilities
    dropped = False
    while node is not softmax:
        if node.op != "call_function" or node.target not in LAYOUT_OPS:
            return False
        if node.target is aten.slice.Tensor and node.args[1] in (-1, _last_dim(node)):
            dropped = dropped or (len(node.args) > 3 and node.args[2] == 0 and node.args[3] == -1)
        node = node.args[0]
    return dropped


def _probability_consumer(softmax: fx.Node) -> fx.Node | None:
    """The matmul(p, v) fed by the softmax through casts and the (identity, at inference) dropout.

    The probabilities may have other users too (eager attention returns them as attention weights).
    """
    chain = [softmax]
    while chain:
        node = chain.pop()
        for user in node.users:
            if user.target in MATMUL_OPS and user.args[0] is node:
                return user
            if user.target in LAYOUT_OPS:
                chain.append(user)
    return None


def _match_site(capture, kind, q, k, v, out, scale, sink) -> LatentAttentionMatch | FailedMatch:
    """The skeleton at one attention site (from the values back to the projections, then forward to o_proj)."""
    selection = find_token_selection(capture, q, k, v, out)
    if isinstance(selection, FailedMatch):
        return selection
    up = walk_back_through_layout(v)
    if not is_linear(up) or up.args[1].op != "placeholder":
        return VALUES_NOT_PROJECTED
    latent = up.args[0]
    down = _nearest_linear_ancestor(latent)
    if down is None:
        return NO_DOWN_PROJECTION
    rope_key = _rope_key(k, up, down)
    if isinstance(rope_key, FailedMatch):
        return rope_key
    o_proj, gate = _output_projection_and_gate(capture, out)
    if isinstance(o_proj, FailedMatch):
        return o_proj
    dims = _dims(capture, q, v, up, rope_key, o_proj)
    if isinstance(dims, FailedMatch):
        return dims
    if gate is not None and gate_width(gate, dims) is None:
        return OUTPUT_GATE_SHAPE
    if sink is not None and (sink.name not in capture.parameter_inputs
                             or int(tensor_meta(sink).shape[0]) != dims.n_h):
        return ATTENTION_SINK_SHAPE
    q_linear = _nearest_linear_ancestor(q)
    q_lora = q_linear is not None and any(is_linear(n) for n in ancestors(q_linear))
    if q_lora:
        dims = replace(dims, q_lora_rank=int(tensor_meta(q_linear.args[0]).shape[-1]))
    matched = len((ancestors(o_proj) | {o_proj}) - {n for n in ancestors(o_proj) if n.op == "placeholder"})
    match = LatentAttentionMatch(
        module_path=capture.module_path,
        attention_kind=kind,
        query=q,
        latent=latent,
        rope_key=rope_key,
        key=k,
        value=v,
        attention_output=out,
        up_projection=up,
        down_projection=down,
        output_projection=o_proj,
        scaling=scale,
        dims=dims,
        q_lora=q_lora,
        matched_nodes=matched,
        output_gate=gate,
        attention_sink=sink,
        selection=selection,
    )
    logger.debug("latent attention in %s: %s", capture.module_path, dims)
    return match


def _rope_key(k: fx.Node, up: fx.Node, down: fx.Node) -> fx.Node | FailedMatch:
    """The only tensor that reaches the keys from the down-projection without passing the up-projection,
    last before it merges with the expanded keys."""
    up_and_above = ancestors(up) | {up}
    key_sources = ancestors(k) | {k}
    if up not in key_sources:
        return KEYS_NOT_FROM_LATENT
    rope_keys = [
        n
        for n in key_sources
        if tensor_meta(n) is not None
        and n not in up_and_above
        and down in ancestors(n)
        and up not in ancestors(n)
        and any(up in (ancestors(u) | {u}) for u in n.users if u in key_sources)
    ]
    if len(rope_keys) != 1:
        return rope_key_count(len(rope_keys))
    return rope_keys[0]


def _output_projection_and_gate(capture, out: fx.Node) -> tuple[fx.Node | FailedMatch, fx.Node | None]:
    """The output projection after the attention, and the optional gate multiplied in between (per head or
    per value channel: the last dim, 1 or d_v, is checked against the dims by the caller)."""
    user = walk_forward_through_layout(out)
    gate = None
    if user is not None and user.target is aten.mul.Tensor:
        attention_side = [a for a in user.args if isinstance(a, fx.Node) and (a is out or out in ancestors(a))]
        others = [a for a in user.args if isinstance(a, fx.Node) and a not in attention_side]
        meta = tensor_meta(others[0]) if len(others) == 1 else None
        batch_sym, seq_sym = batch_and_seq_symbols(capture)
        if (len(attention_side) != 1 or meta is None or meta.dim() not in (3, 4)
                or [str(s) for s in meta.shape[:2]] != [batch_sym, seq_sym]):
            return OUTPUT_GATE_SHAPE, None
        gate, user = others[0], walk_forward_through_layout(user)
    if user is None or not is_linear(user):
        return OUTPUT_NOT_PROJECTED, None
    return user, gate


def gate_width(gate: fx.Node, dims: LatentDims) -> int | None:
    """Values an output gate holds per head and token: 1 (per head) or d_v (per value channel), for a gate
    [B, T, n_h, 1 or d_v] or one with the heads flattened, [B, T, n_h d_v]; None for any other shape."""
    shape = [int(s) for s in tensor_meta(gate).shape[2:]]
    if len(shape) == 2 and shape[0] == dims.n_h and shape[1] in (1, dims.d_v):
        return shape[1]
    return dims.d_v if shape == [dims.n_h * dims.d_v] else None


def _nearest_linear_ancestor(node: fx.Node) -> fx.Node | None:
    frontier = [node]
    seen: set[fx.Node] = set()
    while frontier:
        nxt = []
        for n in frontier:
            for inp in n.all_input_nodes:
                if inp in seen:
                    continue
                seen.add(inp)
                if is_linear(inp):
                    return inp
                nxt.append(inp)
        frontier = nxt
    return None


def _dims(capture, q, v, up, rope_key, o_proj) -> LatentDims | FailedMatch:
    qm, vm, rm = tensor_meta(q), tensor_meta(v), tensor_meta(rope_key)
    weight = _placeholder_shape(capture, up.args[1])
    o_weight = _placeholder_shape(capture, o_proj.args[1])
    if qm is None or vm is None or rm is None or weight is None or o_weight is None:
        return shape_mismatch("a query, value, RoPE key or weight without a known shape")
    if qm.dim() != 4:
        return shape_mismatch(f"the query has {qm.dim()} dims, not [batch, heads, seq, head dim]")
    n_h, d_qk, d_v, d_r = int(qm.shape[1]), int(qm.shape[-1]), int(vm.shape[-1]), int(rm.shape[-1])
    d_n, d_c = d_qk - d_r, int(weight[1])
    if d_n < 0 or weight[0] % (d_n + d_v):
        return shape_mismatch(f"the up-projection's {weight[0]} rows are not whole heads of d_n + d_v = "
                               f"{d_n} + {d_v}")
    n_up = weight[0] // (d_n + d_v)  # heads the up-projection produces: n_g (grouped) or n_h (per head)
    if n_h % n_up or o_weight[1] != n_h * d_v:
        return shape_mismatch(f"{n_up} up-projected heads and an output projection of {o_weight[1]} inputs do "
                               f"not fit {n_h} query heads of {d_v} value dims")
    # n_g is settled by probing (identical per-head blocks form a group); start from the row count.
    try:
        return LatentDims(n_h=n_h, n_g=n_up, d_c=d_c, d_R=d_r, d_n=d_n, d_v=d_v, hidden_size=int(o_weight[0]))
    except ValueError as exc:  # e.g. a RoPE key of no dims: a named failure, not a crash of detection
        return shape_mismatch(str(exc))


def _placeholder_shape(capture: CapturedAttention, node: fx.Node) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    if node.op != "placeholder" or node.name not in capture.parameter_inputs or meta is None:
        return None
    return tuple(int(s) for s in meta.shape)
