"""Detect latent attention in a captured aten graph, by its dataflow alone.

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
    mask <- [scatter(top-k indices) into the mask]          optional token selection (sparse attention, DSA)
      indices <- topk(scores computed from the block's own projections and index keys)   an indexer, or
      indices <- stateful_child(...)   an indexer that reads the cache itself, kept as one opaque call
                                       (capture.retrace_with_stateful_children), or
      indices <- a block input                                 a selection another block made (shared)
      [clamped into the traced key length: indices outside the cache select nothing, transformers' -1]

Dims come from shapes; the group structure of the up-projection (n_g) and its per-group matrices come
from probing the graph with basis vectors fed where the latent was (so any row layout, GQA broadcast or
per-head expansion is handled the same way).
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field, replace

import torch
from torch import fx

from ..capture import CapturedAttention, TraceFailure  # importing capture registers STATEFUL_CHILD's op
from .context import LayerContext
from ..dims import LatentDims
from ..errors import ShapeMismatchError
from .graph import (
    LAYOUT_OPS,
    backward_closure,
    MATMUL_OPS,
    SDPA_OPS,
    SOFTMAX_OPS,
    ancestors,
    evaluate_nodes,
    is_linear,
    op_histogram,
    tensor_meta,
    walk_back_through_layout,
    walk_forward_through_layout,
)


logger = logging.getLogger(__name__)
aten = torch.ops.aten


class FailedMatch(str):
    """Why the skeleton did not match (at one attention site, or in the whole graph), as a sentence.

    Like Inductor's ``FailedMatch``: every way matching can fail returns one of these instead of None, so
    the reason reaches the warning, ``OptimizationState.skipped`` and the report.
    """


# The ways the skeleton can fail to match, one name each.
NO_ATTENTION = FailedMatch("no attention in the graph (neither scaled_dot_product_attention nor "
                           "matmul -> softmax -> matmul)")
EAGER_ATTENTION_SHAPE = FailedMatch("a softmax that is not eager attention (matmul(q, k^T) [scale] [mask] -> softmax "
                                    "-> matmul(p, v))")
VALUES_NOT_PROJECTED = FailedMatch("the attention's values do not come from a linear on a weight (no latent "
                                   "up-projection)")
NO_DOWN_PROJECTION = FailedMatch("no linear above the up-projection's input (no latent down-projection)")
KEYS_NOT_FROM_LATENT = FailedMatch("keys are not expanded from the same latent as the values")
OUTPUT_NOT_PROJECTED = FailedMatch("the attention output does not flow into one linear (no output projection)")
UP_PROJECTION_BIAS = FailedMatch("the latent up-projection has a bias; absorbing it is not supported")
OUTPUT_GATE_SHAPE = FailedMatch("a product between the attention and the output projection that is not a gate "
                                "[batch, seq, heads, 1 or d_v] computed without the attention")
ATTENTION_SINK_SHAPE = FailedMatch("a score column joined before the softmax that is not a learned attention sink (a "
                                   "parameter of one logit per query head, dropped after the softmax)")
LEARNED_TOKEN_SELECTION = FailedMatch("the attention's mask is computed by its own projections in a form other than "
                                      "top-k token indices scattered into the mask (a learned token selection the "
                                      "sparse piece does not recognise)")
INDEX_KEYS_UNCLEAR = FailedMatch("a top-k token selection whose index keys (the [batch, seq, dims] tensor an "
                                 "indexer caches) are not one tensor")

#: Failures that mean "latent attention, with a piece the paths do not rewrite", not "no latent attention".
UNSUPPORTED_LATENT_PIECES = frozenset({LEARNED_TOKEN_SELECTION, INDEX_KEYS_UNCLEAR, UP_PROJECTION_BIAS})


def _rope_key_count(count: int) -> FailedMatch:
    return FailedMatch(f"{count} candidate RoPE keys (tensors reaching the keys from the down-projection without the "
                       "up-projection); latent attention has exactly one")


def _shape_mismatch(detail: str) -> FailedMatch:
    return FailedMatch(f"shapes do not fit latent attention: {detail}")


@dataclass
class LatentAttentionMatch:
    """Where latent attention sits in one captured graph, with its dims and weights' placeholder names.

    ``dims.n_g`` is the up-projection's row count until probing (:func:`detect_layer`) settles it and
    attaches the per-group up-projections as ``up_projections``.
    """

    module_path: str
    attention_kind: str  # "sdpa" or "eager"
    query: fx.Node  # attention's query input [B, n_h, T, d_n + d_R]
    latent: fx.Node  # input of the up-projection (normalised latent)
    rope_key: fx.Node  # the shared RoPE key, last node before it merges with the expanded keys
    key: fx.Node
    value: fx.Node
    attention_output: fx.Node  # [B, n_h, T, d_v]
    up_projection: fx.Node  # linear(latent, W_UKV)
    down_projection: fx.Node  # linear(x, W_DKV)
    output_projection: fx.Node  # linear(., W_O[, b_O])
    scaling: float
    dims: LatentDims
    q_lora: bool
    matched_nodes: int = 0
    up_projections: UpProjections | None = None  # set by probing: W_UK, W_UV per group
    output_gate: fx.Node | None = None  # optional gate (see gate_width) multiplied before o_proj
    attention_sink: fx.Node | None = None  # optional learned sink logits [n_h] (a parameter placeholder)
    selection: TokenSelection | None = None  # optional top-k token selection (sparse attention)

    def weight_name(self, capture: CapturedAttention, linear: fx.Node, index: int = 1) -> str | None:
        """Parameter name behind a linear's weight (index 1) or bias (index 2) placeholder."""
        if len(linear.args) <= index or linear.args[index] is None:
            return None
        return capture.parameter_inputs.get(linear.args[index].name)


@dataclass
class Detection:
    """What detection found in one layer: the match, or every reason it did not match."""

    module_path: str
    match: LatentAttentionMatch | None
    failures: list[FailedMatch] = field(default_factory=list)

    @property
    def has_attention(self) -> bool:
        """Whether the graph holds an attention at all (a block with attention that did not match is news)."""
        return self.match is not None or any(f != NO_ATTENTION for f in self.failures)

    @property
    def latent_but_unsupported(self) -> bool:
        """Latent attention was recognised (at one of the attention sites) but holds a piece no path rewrites yet
        (not "no latent attention")."""
        return self.match is None and bool(set(self.failures) & UNSUPPORTED_LATENT_PIECES)

    @property
    def reason(self) -> str:
        """One sentence for the warning, ``skipped`` and the report (empty for a match)."""
        if self.match is not None:
            return ""
        unique = list(dict.fromkeys(self.failures))
        return "; ".join(unique) if unique else str(NO_ATTENTION)


def attention_left_unchanged(failures: list[TraceFailure], detections: list[Detection]) -> list[tuple[str, str]]:
    """(path, why) of the blocks a rewrite or conversion leaves as they were although they hold attention (or
    could not be traced, so may): what its partial-rewrite warning names."""
    return [(f.module_path, f.reason) for f in failures] + [
        (d.module_path, d.reason) for d in detections if d.match is None and d.has_attention]


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


def detect_latent_attention(capture: CapturedAttention) -> LatentAttentionMatch | None:
    """Find the latent-attention skeleton in a captured graph; None when the graph holds none.

    The match's n_g is provisional (the up-projection's row count); :func:`detect_layer` probes it.
    """
    return find_latent_attention(capture).match


def detect_layer(capture: CapturedAttention, parameters: dict[str, torch.Tensor]) -> Detection:
    """Detection of one layer, complete: the match with n_g and the per-group up-projections probed from
    this layer's own ``parameters`` (layers of one structure share the graph, never the weights)."""
    detection = find_latent_attention(capture)
    if detection.match is None:
        return detection
    try:
        up = probe_up_projections(capture, detection.match, parameters)
    except ShapeMismatchError as exc:
        failure = UP_PROJECTION_BIAS if "has a bias" in str(exc) else _shape_mismatch(str(exc))
        return Detection(capture.module_path, None, [failure])
    match = replace(detection.match, dims=replace(detection.match.dims, n_g=up.num_groups), up_projections=up)
    return Detection(capture.module_path, match)


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
        return _rope_key_count(len(rope_keys))
    (rope_key,) = rope_keys
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


@dataclass
class TokenSelection:
    """The optional sparse piece: top-k token indices scattered into the attention's mask (DSA).

    The indices come from a ``topk`` over scores the block computes with its own projections (an indexer,
    kept unchanged: it stays a graph) or from a block input (a selection an earlier block made and passes on).
    ``index_key`` is the indexer's per-token key [B, T, d_I]: what the family caches (transformers'
    ``cache.update_indexer``), so that the selection scores every cached token.
    """

    indices: fx.Node  # the indices as scattered into the mask (before any clamp), [B, T, k]
    source: fx.Node  # the topk's index output, the stateful child's call, or the block input they come from
    top_k: int | None  # k of the topk, or the stateful child's output width (None: unknown, a block input)
    topk: fx.Node | None
    index_key: fx.Node | None
    returned: dict[int, fx.Node] = field(default_factory=dict)  # block output position -> indices it returns
    replaces_mask: bool = False  # the block's attention mask reaches the attention only through the selection

    @property
    def shared(self) -> bool:
        """Whether the indices are a block input (another block's selection) rather than computed here."""
        return self.source.op == "placeholder"

    @property
    def stateful(self) -> bool:
        """Whether the indices come from a child module that reads the cache (run as the family wrote it)."""
        return self.source.op == "call_function" and self.source.target is STATEFUL_CHILD


#: Ops that write values at indices (a selection scattered into a mask).
SCATTER_OPS = {aten.scatter.value, aten.scatter.src, aten.scatter_.value, aten.scatter_.src,
               aten.scatter_add.default, aten.scatter_add_.default}
#: Ops that clamp indices into the traced key length before they are scattered.
CLAMP_OPS = {aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default}
STATEFUL_CHILD = torch.ops.gqla_compile.stateful_child.default


def find_token_selection(capture, q, k, v, out) -> TokenSelection | FailedMatch | None:
    """The top-k selection that masks the attention, if any; a mask computed any other way by the block's own
    projections is a ``LEARNED_TOKEN_SELECTION`` failure (the causal mask itself is a graph input)."""
    through_qkv = ancestors(q) | ancestors(k) | ancestors(v) | {q, k, v}
    off_path = ancestors(out) - through_qkv
    projections = [n for n in off_path if is_linear(n)]
    scatters = [n for n in off_path if n.op == "call_function" and n.target in SCATTER_OPS]
    if not scatters:
        return LEARNED_TOKEN_SELECTION if projections else None
    if len(scatters) != 1:
        return LEARNED_TOKEN_SELECTION
    (scatter,) = scatters
    indices = _unclamped(scatter.args[2])
    source = walk_back_through_layout(indices)
    if source.op == "call_function" and source.target is aten.topk.default:
        source = next((u for u in source.users if u.target is operator.getitem and u.args[1] == 1), None)
    topk = None
    if source is not None and source.op == "call_function" and source.target is operator.getitem:
        topk = source.args[0] if source.args[0].target is aten.topk.default and source.args[1] == 1 else None
        if topk is None:
            return LEARNED_TOKEN_SELECTION
    elif source is None or not (source.op == "placeholder" or source.target is STATEFUL_CHILD):
        return LEARNED_TOKEN_SELECTION
    selector = topk if topk is not None else source
    if source.op != "placeholder" and any(n not in ancestors(selector) for n in projections):
        return LEARNED_TOKEN_SELECTION
    written = scatter.args[3] if len(scatter.args) > 3 else None
    if isinstance(written, fx.Node) and source not in ancestors(written):
        return LEARNED_TOKEN_SELECTION  # the values scattered say more than "selected" (or whether in range)
    index_key = None
    if topk is not None:
        keys = _index_keys(capture, topk)
        if len(keys) != 1:
            return INDEX_KEYS_UNCLEAR
        (index_key,) = keys
    output = next(n for n in capture.graph_module.graph.nodes if n.op == "output")
    returned = {i: node for i, node in enumerate(output.args[0])
                if isinstance(node, fx.Node) and walk_back_through_layout(node) is walk_back_through_layout(indices)}
    top_k = _top_k(topk) if topk is not None else _fixed_width(source) if source.op != "placeholder" else None
    return TokenSelection(indices, source, top_k, topk, index_key, returned,
                          replaces_mask=not (_mask_inputs(capture) & backward_closure([out], stop={source})))


def _unclamped(node: fx.Node) -> fx.Node:
    """The indices a scatter writes at, before any clamp into the traced key length: the runtime reads
    indices outside the cache as selecting nothing (transformers' -1 for "no token")."""
    chain = node
    while chain.op == "call_function" and (chain.target in LAYOUT_OPS or chain.target in CLAMP_OPS) and chain.args:
        if chain.target in CLAMP_OPS:
            node = chain.args[0]
        chain = chain.args[0]
    return node


def _fixed_width(source: fx.Node) -> int | None:
    """The last dim of a stateful child's indices when it is a constant (tokens selected per query)."""
    width = tensor_meta(source).shape[-1]
    return width if isinstance(width, int) else None


def _mask_inputs(capture: CapturedAttention) -> set[fx.Node]:
    """The block's attention-mask placeholders."""
    return {capture.placeholder(p) for p, (name, _) in zip(capture.user_placeholders, capture.user_inputs)
            if name == "attention_mask"}


def _index_keys(capture, topk: fx.Node) -> list[fx.Node]:
    """The [batch, seq, dims] tensors that reach a score matmul of the selection as its right operand (keys)."""
    batch_sym, seq_sym = batch_and_seq_symbols(capture)
    found = []
    for node in ancestors(topk):
        if node.op != "call_function" or node.target not in MATMUL_OPS:
            continue
        operand = node.args[1]
        while True:
            meta = tensor_meta(operand)
            if meta is not None and meta.dim() == 3 and [str(s) for s in meta.shape[:2]] == [batch_sym, seq_sym]:
                found.append(operand)
                break
            if operand.op != "call_function" or operand.target not in LAYOUT_OPS:
                break
            operand = operand.args[0]
    return list(dict.fromkeys(found))


def _top_k(topk: fx.Node) -> int:
    """The k of a topk node: a constant, or the constant of ``min(k, number of keys)``."""
    k = topk.args[1]
    if isinstance(k, int):
        return k
    constants = [a for a in k.args if isinstance(a, int)]
    if len(constants) != 1:
        raise ShapeMismatchError(f"a top-k whose k is neither a constant nor min(constant, length): {k}")
    return constants[0]


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
        return _shape_mismatch("a query, value, RoPE key or weight without a known shape")
    if qm.dim() != 4:
        return _shape_mismatch(f"the query has {qm.dim()} dims, not [batch, heads, seq, head dim]")
    n_h, d_qk, d_v, d_r = int(qm.shape[1]), int(qm.shape[-1]), int(vm.shape[-1]), int(rm.shape[-1])
    d_n, d_c = d_qk - d_r, int(weight[1])
    if d_n < 0 or weight[0] % (d_n + d_v):
        return _shape_mismatch(f"the up-projection's {weight[0]} rows are not whole heads of d_n + d_v = "
                               f"{d_n} + {d_v}")
    n_up = weight[0] // (d_n + d_v)  # heads the up-projection produces: n_g (grouped) or n_h (per head)
    if n_h % n_up or o_weight[1] != n_h * d_v:
        return _shape_mismatch(f"{n_up} up-projected heads and an output projection of {o_weight[1]} inputs do "
                               f"not fit {n_h} query heads of {d_v} value dims")
    # n_g is settled by probing (identical per-head blocks form a group); start from the row count.
    try:
        return LatentDims(n_h=n_h, n_g=n_up, d_c=d_c, d_R=d_r, d_n=d_n, d_v=d_v, hidden_size=int(o_weight[0]))
    except ValueError as exc:  # e.g. a RoPE key of no dims: a named failure, not a crash of detection
        return _shape_mismatch(str(exc))


def _placeholder_shape(capture: CapturedAttention, node: fx.Node) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    if node.op != "placeholder" or node.name not in capture.parameter_inputs or meta is None:
        return None
    return tuple(int(s) for s in meta.shape)


@dataclass
class UpProjections:
    """Per-group up-projections read off the graph: W_UK [n_g, d_n, d_c] and W_UV [n_g, d_v, d_c]."""

    key: torch.Tensor
    value: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.key.shape[0]


def probe_up_projections(
    capture: CapturedAttention,
    match: LatentAttentionMatch,
    parameters: dict[str, torch.Tensor],
) -> UpProjections:
    """Feed basis vectors where the latent was and read the keys' no-RoPE part and the values.

    The map latent -> (K_nope, V) is linear, so column s of each head's matrix is the output for basis
    vector e_s. Heads whose matrices are identical in consecutive blocks form one group: that is n_g,
    whether the graph broadcast K/V per group (GQA) or per head (MLA, n_g = n_h).
    """
    dims = match.dims
    feeds = probe_feeds(capture, match, parameters, seq=dims.d_c)
    latent_meta = tensor_meta(match.latent)
    device = _parameters_device(parameters)
    basis = torch.eye(dims.d_c, dtype=latent_meta.dtype, device=device)
    feeds[match.latent] = _in_layout(basis, latent_meta, capture, batch=1, seq=dims.d_c)
    rope_meta = tensor_meta(match.rope_key)
    feeds[match.rope_key] = torch.zeros(_concrete_shape(rope_meta, capture, batch=1, seq=dims.d_c),
                                        dtype=rope_meta.dtype, device=device)
    with torch.no_grad():
        key, value = evaluate_nodes(capture.graph_module, [match.key, match.value], feeds)
        feeds[match.latent] = torch.zeros_like(feeds[match.latent])
        key0, value0 = evaluate_nodes(capture.graph_module, [match.key, match.value], feeds)
    if key0[..., : dims.d_n].abs().max() > 0 or value0.abs().max() > 0:
        raise ShapeMismatchError(
            f"{match.module_path}: the latent up-projection has a bias; absorbing it is not supported"
        )
    # key: [1, heads, d_c, d_n + d_R] -> per head [d_n, d_c]
    w_uk = key[0, :, :, : dims.d_n].transpose(1, 2)
    w_uv = value[0].transpose(1, 2)
    w_uk, w_uv = _per_query_head(w_uk, dims.n_h), _per_query_head(w_uv, dims.n_h)
    n_g = _group_count(w_uk, w_uv)
    step = dims.n_h // n_g
    return UpProjections(key=w_uk[::step].contiguous(), value=w_uv[::step].contiguous())


def _per_query_head(per_kv_head: torch.Tensor, n_h: int) -> torch.Tensor:
    heads = per_kv_head.shape[0]
    if n_h % heads:
        raise ShapeMismatchError(f"{heads} key/value heads do not divide {n_h} query heads")
    return per_kv_head.repeat_interleave(n_h // heads, dim=0)


def _group_count(w_uk: torch.Tensor, w_uv: torch.Tensor) -> int:
    """Smallest n_g for which each block of n_h / n_g consecutive heads shares one up-projection."""
    n_h = w_uk.shape[0]
    for n_g in range(1, n_h + 1):
        if n_h % n_g:
            continue
        step = n_h // n_g
        if all(
            torch.equal(w[g * step], w[g * step + j]) for w in (w_uk, w_uv) for g in range(n_g) for j in range(step)
        ):
            return n_g
    return n_h


def probe_feeds(capture, match, parameters, *, seq: int) -> dict[fx.Node, torch.Tensor]:
    """Parameters and zero user inputs sized for a probe of ``seq`` tokens and batch 1."""
    feeds: dict[fx.Node, torch.Tensor] = {}
    device = _parameters_device(parameters)
    for node in capture.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in capture.parameter_inputs:
            feeds[node] = parameters[capture.parameter_inputs[node.name]]
        elif (meta := tensor_meta(node)) is not None:
            feeds[node] = torch.zeros(_concrete_shape(meta, capture, batch=1, seq=seq), dtype=meta.dtype, device=device)
    return feeds


def _parameters_device(parameters: dict[str, torch.Tensor]) -> torch.device:
    """Where the block's weights live: the probes' inputs go there (a model on a GPU is probed on it)."""
    return next((t.device for t in parameters.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))


def _concrete_shape(meta: torch.Tensor, capture: CapturedAttention, *, batch: int, seq: int) -> list[int]:
    batch_sym, seq_sym = batch_and_seq_symbols(capture)
    shape = []
    for size in meta.shape:
        text = str(size)
        shape.append(batch if text == batch_sym else seq if text == seq_sym else int(size))
    return shape


def _in_layout(rows: torch.Tensor, meta: torch.Tensor, capture, *, batch: int, seq: int) -> torch.Tensor:
    """Place a [seq, features] matrix into a tensor of ``meta``'s layout (batch 1, other dims broadcast)."""
    shape = _concrete_shape(meta, capture, batch=batch, seq=seq)
    _, seq_sym = batch_and_seq_symbols(capture)
    seq_dim = next(i for i, s in enumerate(meta.shape) if str(s) == seq_sym)
    last = len(shape) - 1
    view = [seq if i == seq_dim else rows.shape[1] if i == last else 1 for i in range(len(shape))]
    return rows.reshape(view).expand(shape).contiguous()


def batch_and_seq_symbols(capture: CapturedAttention) -> tuple[str, str]:
    """The symbolic batch and sequence sizes, read off the hidden-states input [B, T, D]."""
    for node in capture.graph_module.graph.nodes:
        meta = tensor_meta(node)
        if node.op == "placeholder" and node.name not in capture.parameter_inputs and meta is not None and meta.dim() == 3:
            return str(meta.shape[0]), str(meta.shape[1])
    raise ShapeMismatchError(f"{capture.module_path}: no [batch, seq, hidden] input found")


def describe(match: LatentAttentionMatch, capture: CapturedAttention) -> dict:
    """Plain-data summary of a match, for the pass record and the report."""
    return {
        "module": match.module_path,
        "attention": match.attention_kind,
        "dims": match.dims.as_dict(),
        "scaling": match.scaling,
        "q_lora": match.q_lora,
        "matched_nodes": match.matched_nodes,
        "weights": {
            "down_projection": match.weight_name(capture, match.down_projection),
            "up_projection": match.weight_name(capture, match.up_projection),
            "output_projection": match.weight_name(capture, match.output_projection),
        },
        "ops": dict(op_histogram(capture.graph_module)),
        "sparse": describe_selection(match.selection),
    }


def describe_selection(selection: TokenSelection | None) -> dict | None:
    """The sparse piece in plain data (None: dense attention): k and where the selection comes from."""
    if selection is None:
        return None
    return {"top_k": selection.top_k,
            "selection": ("a block input (another block's top-k)" if selection.shared
                          else "an indexer module that reads the cache, called as the family wrote it"
                          if selection.stateful else "indexer top-k"),
            "index_key_dims": None if selection.index_key is None else int(tensor_meta(selection.index_key).shape[-1])}


class DetectLatentAttention:
    """Analysis pass: detection of one layer (match and probing) into its :class:`LayerContext`; the graph is
    returned unchanged."""

    name = "detect"

    def __init__(self, context: LayerContext):
        self.context = context

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.context.detection = detect_layer(self.context.capture, self.context.parameters)
        return gm

    def summary(self) -> dict:
        detection = self.context.detection
        if detection is None or detection.match is None:
            return {"matched": 0, "reason": detection.reason if detection else ""}
        return {"matched": 1, **describe(detection.match, self.context.capture)}
