"""The optional sparse piece of the skeleton: top-k token indices scattered into the attention's mask (DSA).

    mask <- [scatter(top-k indices) into the mask]
      indices <- topk(scores computed from the block's own projections and index keys)   an indexer, or
      indices <- stateful_child(...)   an indexer that reads the cache itself, kept as one opaque call
                                       (capture_stateful.retrace_with_stateful_children), or
      indices <- a block input                                 a selection another block made (shared)
      [clamped into the traced key length: indices outside the cache select nothing, transformers' -1]
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..capture import CapturedAttention
from ..errors import ShapeMismatchError
from ..stateful_op import STATEFUL_CHILD
from .graph import LAYOUT_OPS, MATMUL_OPS, ancestors, backward_closure, is_linear, tensor_meta, walk_back_through_layout
from .match import INDEX_KEYS_UNCLEAR, LEARNED_TOKEN_SELECTION, FailedMatch, TokenSelectionMatch
from .probe import batch_and_seq_symbols

__all__ = ["find_token_selection", "SCATTER_OPS", "CLAMP_OPS"]

aten = torch.ops.aten

#: Ops that write values at indices (a selection scattered into a mask).
SCATTER_OPS = {aten.scatter.value, aten.scatter.src, aten.scatter_.value, aten.scatter_.src,
               aten.scatter_add.default, aten.scatter_add_.default}
#: Ops that clamp indices into the traced key length before they are scattered.
CLAMP_OPS = {aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default}


def find_token_selection(capture, q, k, v, out) -> TokenSelectionMatch | FailedMatch | None:
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
    return TokenSelectionMatch(indices, source, top_k, topk, index_key, returned,
                               replaces_mask=not (_mask_inputs(capture) & backward_closure([out], stop={source})),
                               stateful=source.op == "call_function" and source.target is STATEFUL_CHILD)


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
