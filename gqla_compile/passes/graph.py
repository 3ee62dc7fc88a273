"""Small helpers over captured aten graphs, shared by the passes.

The captured graphs (see ``gqla_compile/capture.py``) are functional aten graphs whose parameters are
placeholders; nodes carry ``meta["val"]`` (fake tensors with symbolic batch and sequence sizes).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import fx

aten = torch.ops.aten

#: Ops that only move, view, split, cast or copy data: walking through them keeps "the same tensor".
LAYOUT_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.slice.Tensor,
    aten.select.int,
    aten.split_with_sizes.default,
    aten.split.Tensor,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.type_as.default,
    aten.repeat_interleave.self_int,
    aten.flatten.using_ints,
    aten.unflatten.int,
    operator.getitem,
}
LINEAR_OPS = {aten.linear.default}
#: Ops that give a tensor a new shape from a size list (what the shard pass re-sizes to the rank's heads).
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
#: Ops that multiply by a matrix: what the report lists with the weights they take.
WEIGHT_MATMUL_OPS = {
    aten.linear.default, aten.matmul.default, aten.bmm.default, aten.mm.default, aten.addmm.default,
    aten.baddbmm.default, torch.matmul, torch.bmm, torch.nn.functional.linear, torch._C._nn.linear,
}
#: Tensor methods that only view or copy (the tails the paths append are traced from plain PyTorch).
VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "flatten", "unflatten",
                "contiguous", "t", "select", "to", "type_as", "repeat_interleave", "detach"}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The fake tensor a node produces, or None for non-tensor nodes."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node the given node depends on (not including itself)."""
    seen: set[fx.Node] = set()
    stack = input_nodes(node)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(input_nodes(n))
    return seen


def walk_back_through_layout(node: fx.Node) -> fx.Node:
    """Follow a tensor back through views/splits/casts to the op that computed it."""
    while node.op == "call_function" and node.target in LAYOUT_OPS and node.args:
        node = node.args[0]
    return node


#: Ops that check metadata and produce nothing: not real consumers.
CHECK_OPS = {aten._assert_tensor_metadata.default}


def walk_forward_through_layout(node: fx.Node) -> fx.Node | None:
    """Follow a tensor forward through single-user views/casts to the op that consumes it."""
    while True:
        users = [u for u in node.users if u.target not in CHECK_OPS]
        if len(users) != 1:
            return None
        (user,) = users
        if user.op == "call_function" and user.target in LAYOUT_OPS:
            node = user
            continue
        return user


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_OPS


def op_histogram(gm: fx.GraphModule) -> Counter:
    """Counts of ops by their aten name (``aten.linear``, ``aten.matmul``, ...), whatever the graph's level.

    Captured graphs hold aten OpOverloads; the tails the paths append are traced from plain PyTorch
    (``torch.matmul``, ``x.unsqueeze``, ``x[..., :d]``), which are named by the aten op they dispatch to, so
    before and after histograms compare in one naming.
    """
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            counts[node_op_name(node)] += 1
        elif node.op == "call_module":
            counts[f"module:{node.target}"] += 1
    return counts


def node_op_name(node: fx.Node) -> str:
    """The aten name of what a call_function / call_method node computes."""
    target = node.target
    if node.op == "call_method":
        return f"aten.{target}" if hasattr(aten, target) else f"method:{target}"
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[-1]}" if target.namespace == "aten" else str(target)
    if target is operator.getitem:
        source = node.args[0]
        multi_output = isinstance(source, fx.Node) and isinstance(source.meta.get("val"), (list, tuple))
        return "getitem" if multi_output else "aten.slice"  # an output of a split, or indexing a tensor
    name = getattr(target, "__name__", str(target))
    return f"aten.{name}" if hasattr(aten, name) else name


def weight_matmuls(
    gm: fx.GraphModule, weight_of: Callable[[fx.Node], tuple[str, list[int]] | None]
) -> list[dict[str, object]]:
    """Every matrix multiplication in ``gm`` that takes a weight: ``{"op", "weight", "shape"}`` in graph order.

    ``weight_of`` names the node a weight enters the graph by (a parameter placeholder, a ``get_attr``)
    and gives its shape, or returns None; operands are followed back through views, so ``w.unsqueeze(1)``
    is still ``w``. Biases (one dim) are not listed.
    """
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_MATMUL_OPS:
            continue
        op = node_op_name(node).removeprefix("aten.")
        for operand in node.args[:3]:
            if not isinstance(operand, fx.Node):
                continue
            weight = weight_of(_view_source(operand))
            if weight is not None and len(weight[1]) >= 2:
                found.append({"op": op, "weight": weight[0], "shape": list(weight[1])})
    return found


def _view_source(node: fx.Node) -> fx.Node:
    while node.args and isinstance(node.args[0], fx.Node) and (
        (node.op == "call_function" and (node.target in LAYOUT_OPS or node.target is aten.t.default))
        or (node.op == "call_method" and node.target in VIEW_METHODS)
    ):
        node = node.args[0]
    return node


def extract_subgraph(
    gm: fx.GraphModule,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    attributes: Mapping[fx.Node, tuple[str, torch.Tensor]],
) -> fx.GraphModule:
    """Copy the part of ``gm`` that computes ``outputs`` from ``inputs`` into a new GraphModule.

    ``inputs`` become the new placeholders (in order; any node may serve as a cut point), nodes listed in
    ``attributes`` (parameter placeholders) become ``get_attr`` nodes holding the given tensors as
    non-persistent buffers, so that the new module adds nothing to a model's state_dict. Any other
    placeholder the outputs need is an error: the cut must be complete.
    """
    needed = backward_closure(outputs, stop=set(inputs))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root = torch.nn.Module()
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node not in needed or node in env:
            continue
        if node in attributes:
            attr_name, tensor = attributes[node]
            root.register_buffer(attr_name, tensor, persistent=False)
            env[node] = graph.get_attr(attr_name)
            env[node].meta = dict(node.meta)
        elif node.op == "placeholder":
            raise ValueError(f"subgraph needs input {node.name!r}, which is neither an input nor an attribute")
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    sub = fx.GraphModule(root, graph, class_name="LatentSubgraph")
    for name in list(sub._buffers):
        sub._non_persistent_buffers_set.add(name)
    return sub


def backward_closure(outputs: Iterable[fx.Node], stop: set[fx.Node]) -> set[fx.Node]:
    needed: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n not in stop:
            stack.extend(input_nodes(n))
    return needed


def evaluate_nodes(
    gm: fx.GraphModule,
    outputs: Sequence[fx.Node],
    feeds: Mapping[fx.Node, object],
) -> list[torch.Tensor]:
    """Run only what ``outputs`` need, with ``feeds`` standing in for nodes (placeholders or cut points).

    Used to probe a captured graph: feed basis vectors where the latent was, read the keys and values.
    """
    needed = backward_closure(outputs, stop=set(feeds))
    env: dict[fx.Node, object] = dict(feeds)
    for node in gm.graph.nodes:
        if node in env or node not in needed:
            continue
        if node.op != "call_function":
            raise ValueError(f"cannot evaluate {node.op} node {node.name!r} without a feed")
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        env[node] = node.target(*args, **kwargs)
    return [env[n] for n in outputs]


def append_to_graph(
    gm: fx.GraphModule,
    tail: Callable[..., tuple],
    extra_attributes: Mapping[str, torch.Tensor],
    *,
    class_name: str,
    passthrough: int = 0,
) -> fx.GraphModule:
    """Return a copy of ``gm`` whose outputs are ``tail(*old_outputs, *attribute_tensors)``.

    With ``passthrough=n``, the last n old outputs (optional pieces such as an output gate) are not given to
    ``tail`` and follow its results unchanged.

    ``tail`` is a plain PyTorch function (it also runs eagerly and is tested as such); it is traced onto
    the graph with FX proxies, so a rewrite reads as the math it performs. ``extra_attributes`` become
    non-persistent buffers (folded weights) passed to ``tail`` after the old outputs.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    old_outputs: tuple = ()
    for node in gm.graph.nodes:
        if node.op == "output":
            old_outputs = fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    root = torch.nn.Module()
    for name, buf in gm.named_buffers():
        root.register_buffer(name, buf, persistent=False)
    tracer = fx.proxy.GraphAppendingTracer(graph)
    attribute_proxies = []
    for name, tensor in extra_attributes.items():
        root.register_buffer(name, tensor, persistent=False)
        attribute_proxies.append(fx.Proxy(graph.get_attr(name), tracer))
    kept = len(old_outputs) - passthrough
    results = tail(*(fx.Proxy(n, tracer) for n in old_outputs[:kept]), *attribute_proxies)
    graph.output(tuple(r.node for r in results) + tuple(old_outputs[kept:]))
    new = fx.GraphModule(root, graph, class_name=class_name)
    for name in list(new._buffers):
        new._non_persistent_buffers_set.add(name)
    return new


def optional_output_count(gm: fx.GraphModule, required: int = 3) -> int:
    """How many outputs a latent projection graph has beyond its ``required`` ones (optional pieces)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return len(output.args[0]) - required
