"""Capture: record how each candidate block is called, then trace it into an aten graph.

How it is traced (written down here, as the report shows it): the model runs once on a tiny batch with
forward pre-hooks that record each candidate module's call arguments; each module is then traced with
``torch.export.export`` (non-strict) with a dynamic batch and sequence dim, no cache and the attention
mask it was called with, and functionalized with ``run_decompositions({})``. The result is a clean aten graph (``linear``,
``split_with_sizes``, the norm and RoPE ops, one ``scaled_dot_product_attention`` or the eager
matmul/softmax/matmul) whose parameters are placeholders named by the graph signature. Detection works on
that graph alone, never on class or parameter names. The cache update is not in the graph: the installed
attention owns it, as it owns the mask.

Candidates are found by structure: the smallest modules holding at least four ``nn.Linear`` layers and
called with a [batch, seq, hidden] tensor. Layers with the same structure (class and parameter shapes)
are traced once; their graphs differ only in the weights fed to them. A candidate whose recorded call runs
no softmax and no scaled_dot_product_attention (:func:`computes_attention`, one eager run) is not traced:
detection needs one of them, and export spends seconds on a linear-attention layer or an MoE.

A child module that reads the cache itself (a sparse-attention indexer that keeps its own keys and its own
idea of the cache length) cannot be traced without one. :func:`retrace_with_stateful_children` traces such a
block again with each of those children as one opaque op (``gqla_compile::stateful_child``: its tensor
arguments in, its recorded output's shape out), which the installed runtime replaces by a call of the child
itself, with the real cache: the family's own code, unchanged. That retrace lives in capture_stateful.py.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import UserDict
import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import _pytree as pytree

from .trace_cache import TRACES, trace_key

logger = logging.getLogger(__name__)

CAPTURE_METHOD = "torch.export (non-strict, dynamic batch/seq, no cache, the recorded mask) + run_decompositions({})"
RECORD_BATCH, RECORD_SEQ = 2, 11  # sizes of the recording run; distinct from any head count or feature size we use
_MIN_LINEARS = 4
#: The names a cache object is passed under (transformers' attention modules, and hand-written ones).
CACHE_ARGUMENTS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value")


@dataclass
class CallRecord:
    """How a module was called during the recording run, as keyword arguments of its forward."""

    arguments: dict[str, Any]
    output_arity: int = 0  # 0: returns a tensor; n: returns a tuple of n items


@dataclass
class CapturedAttention:
    """One candidate module traced into a functional aten graph with lifted parameters."""

    module_path: str
    graph_module: fx.GraphModule
    parameter_inputs: dict[str, str]  # placeholder name -> parameter name inside the module
    user_inputs: list[tuple[str, int | None]]  # per user placeholder: (argument name, pytree leaf index)
    user_placeholders: list[str]  # the graph's user-input placeholder names, in the order of user_inputs
    argument_names: list[str]  # the forward's parameters in order, for binding positional calls
    structure_key: tuple
    seconds: float
    output_arity: int = 0
    example_arguments: dict[str, Any] = field(default_factory=dict)  # this layer's recorded call
    method: str = CAPTURE_METHOD
    shared_with: list[str] = field(default_factory=list)  # other module paths with the same structure

    def placeholder(self, name: str) -> fx.Node:
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder" and node.name == name:
                return node
        raise KeyError(name)


def find_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Smallest modules with at least four Linear layers: where attention blocks live, by structure alone."""
    counts = {name: sum(isinstance(m, nn.Linear) for m in mod.modules()) for name, mod in model.named_modules()}
    modules = dict(model.named_modules())
    candidates = {}
    for name, mod in modules.items():
        if counts[name] < _MIN_LINEARS or any(isinstance(m, nn.Embedding) for m in mod.modules()):
            continue
        children = [f"{name}.{child}" if name else child for child, _ in mod.named_children()]
        if not any(counts[c] >= _MIN_LINEARS for c in children):
            candidates[name] = mod
    return candidates


def structure_key(module: nn.Module) -> tuple:
    """Two modules with equal keys trace to the same graph."""
    return (type(module), tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()))


def record_calls(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, CallRecord]:
    """Run the model once on a tiny batch and keep each module's first call, bound by name."""
    records: dict[str, CallRecord] = {}
    handles = []

    def make_hook(name: str, module: nn.Module):
        signature = inspect.signature(module.forward)

        def hook(_module, args, kwargs):
            if name not in records:
                records[name] = CallRecord(bind_arguments(signature, args, kwargs))

        return hook

    def record_output(name: str):
        def hook(_module, _args, output):
            if name in records:
                records[name].output_arity = len(output) if isinstance(output, tuple) else 0

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(make_hook(name, module), with_kwargs=True))
        handles.append(module.register_forward_hook(record_output(name)))
    try:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
        device = next(model.parameters()).device
        input_ids = torch.randint(0, vocab, (RECORD_BATCH, RECORD_SEQ), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return records


def bind_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Positional and keyword call arguments as one flat name -> value dict (``**kwargs`` flattened)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    flat: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"cannot capture a forward called with extra positional arguments: {name}")
        else:
            flat[name] = value
    return flat


class OpaqueTrace(Protocol):
    """What :func:`capture_module` needs of a block's opaque children (capture_stateful.OpaqueChildren): a
    context in which they trace as opaque ops, and what the trace depends on besides the block."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...

    def key(self) -> tuple: ...


def capture_module(path: str, module: nn.Module, record: CallRecord, *,
                   opaque_children: OpaqueTrace | None = None) -> CapturedAttention:
    """Trace one module with torch.export, dynamic in batch and sequence, with no cache and its recorded mask
    (``opaque_children``: its stateful children as opaque ops while tracing); a block this process traced
    before with everything the trace depends on equal (trace_cache.py) reuses that graph."""
    arguments = _export_arguments(module, record)
    context = () if opaque_children is None else opaque_children.key()

    def export() -> CapturedAttention:
        with opaque_children or contextlib.nullcontext():
            return _export_block(path, module, record, arguments)

    traced, reused = TRACES.get_or_trace(trace_key(module, arguments, context), export)
    if reused:
        logger.debug("%s: reused the trace of an identical block", path)
    return replace(traced, module_path=path, seconds=0.0 if reused else traced.seconds,
                   example_arguments=record.arguments, shared_with=[])


def _export_arguments(module: nn.Module, record: CallRecord) -> dict[str, Any]:
    """The recorded call's arguments as export is given them."""
    # Only the forward's named parameters: what travels through **kwargs (position_ids, use_cache, ...)
    # only configures the attention call, which the paths replace; torch.export cannot give it dynamic dims.
    named = inspect.signature(module.forward).parameters
    return {
        k: _traceable_argument(k, v)
        for k, v in record.arguments.items()
        if k in named and named[k].kind is not inspect.Parameter.VAR_KEYWORD
    }


def _export_block(path: str, module: nn.Module, record: CallRecord, arguments: dict[str, Any]) -> CapturedAttention:
    start = time.perf_counter()
    # Dynamic dims export may narrow (a DSA indexer's ``min(top_k, seq)`` guards seq >= top_k): the graph is
    # kept as a graph of the block's operations, not called through export's guards.
    batch, seq = Dim.DYNAMIC, Dim.DYNAMIC
    dynamic = _dynamic_shapes(arguments, batch, seq)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export's own pytree deprecation notice (LeafSpec) says nothing to our users.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        exported = torch.export.export(module, (), kwargs=arguments, dynamic_shapes=dynamic, strict=False)
        exported = exported.run_decompositions({})
    signature = exported.graph_signature
    parameter_inputs = dict(signature.inputs_to_parameters)
    parameter_inputs.update(signature.inputs_to_buffers)
    user_inputs = _user_input_sources(arguments)
    user_placeholders = [
        n.name
        for n in exported.graph_module.graph.nodes
        if n.op == "placeholder" and n.name not in parameter_inputs and isinstance(n.meta.get("val"), torch.Tensor)
    ]
    if len(user_placeholders) != len(user_inputs):
        raise RuntimeError(f"{path}: {len(user_placeholders)} graph inputs for {len(user_inputs)} tensor arguments")
    return CapturedAttention(
        module_path=path,
        graph_module=exported.graph_module,
        parameter_inputs=parameter_inputs,
        user_inputs=user_inputs,
        user_placeholders=user_placeholders,
        argument_names=list(inspect.signature(module.forward).parameters),
        structure_key=structure_key(module),
        seconds=time.perf_counter() - start,
        output_arity=record.output_arity,
        example_arguments=record.arguments,
    )


def _traceable_argument(name: str, value: Any) -> Any:
    """What export is given for one recorded argument: no cache (the installed runtime owns it); a dict-like
    container the model shares between blocks (``collections.UserDict``, e.g. ``KVSharingDict``) as a plain
    dict copy, which export flattens like any dict and the block may still write to; the rest as recorded."""
    if name in CACHE_ARGUMENTS:
        return None
    if isinstance(value, UserDict):
        return dict(value)
    return value


def _dynamic_shapes(arguments: dict[str, Any], batch: Dim, seq: Dim) -> dict:
    return {name: pytree.tree_map(lambda v: _dims_of(v, batch, seq), value) for name, value in arguments.items()}


def _dims_of(value: Any, batch: Dim, seq: Dim) -> dict[int, Dim] | None:
    if not isinstance(value, torch.Tensor):
        return None
    dims = {}
    for i, size in enumerate(value.shape):
        if i == 0 and size == RECORD_BATCH:
            dims[i] = batch
        elif size == RECORD_SEQ:
            dims[i] = seq
    return dims or None


def _user_input_sources(arguments: dict[str, Any]) -> list[tuple[str, int | None]]:
    """For each tensor leaf, in the order export flattens them: (argument name, leaf index or None)."""
    sources = []
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            sources.append((name, None))
            continue
        leaves = pytree.tree_leaves(value)
        sources.extend((name, i) for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
    return sources


@dataclass
class TraceFailure:
    """A candidate block torch.export could not trace: reported, never silently dropped."""

    module_path: str
    module_type: str
    error: str  # "ExceptionType: message"

    @property
    def reason(self) -> str:
        return f"could not be traced by torch.export ({self.error})"


@dataclass
class CaptureResult:
    """Every candidate block of a model: the traced ones, the ones that could not be traced, and the ones not
    traced because their recorded call computes no attention."""

    captures: list[CapturedAttention]
    failures: list[TraceFailure]
    candidates: int  # candidate blocks found by structure (called during the recording run or not)
    without_attention: list[str] = field(default_factory=list)


#: Words in the name of every aten op an attention dispatches to (softmax, _safe_softmax, the
#: scaled_dot_product_attention kernels): a call that runs none of them computes no attention.
ATTENTION_OP_WORDS = ("softmax", "attention")


class _AttentionOpCensus(TorchDispatchMode):
    """Notes whether any op an attention dispatches to runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen = self.seen or any(word in func.name() for word in ATTENTION_OP_WORDS)
        return func(*args, **(kwargs or {}))


def computes_attention(module: nn.Module, record: CallRecord) -> bool:
    """Whether ``module``'s recorded call runs an attention (softmax or scaled_dot_product_attention), found by
    running it once eagerly (milliseconds) rather than tracing it: detection needs one of those ops in the
    graph, and torch.export spends seconds on a block without them (a hybrid model's linear attention, an
    MoE). True when the call cannot be re-run (export then decides)."""
    census = _AttentionOpCensus()
    try:
        with torch.no_grad(), census:
            module(**record.arguments)
    except Exception as exc:  # noqa: BLE001 - export, which reports its own errors, decides then
        logger.debug("%s could not be re-run for its op census (%s); it is traced", type(module).__name__, exc)
        return True
    return census.seen


def capture_candidates(model: nn.Module) -> CaptureResult:
    """Capture every candidate block, tracing each distinct structure once; untraceable blocks are kept as
    :class:`TraceFailure` with the exception (every layer sharing that structure fails the same way)."""
    candidates = find_candidates(model)
    if not candidates:
        return CaptureResult([], [], 0)
    records = record_calls(model, candidates)
    by_structure: dict[tuple, CapturedAttention | TraceFailure] = {}
    no_attention: set[tuple] = set()  # structures whose recorded call runs no attention op
    captures, failures, without_attention = [], [], []
    for path, module in candidates.items():
        if path not in records:
            logger.debug("%s was not called during the recording run; skipped", path)
            continue
        key = structure_key(module)
        if key in no_attention or (key not in by_structure and not computes_attention(module, records[path])):
            no_attention.add(key)
            logger.debug("%s computes no attention; not traced", path)
            without_attention.append(path)
            continue
        first = by_structure.get(key)
        if isinstance(first, CapturedAttention):
            first.shared_with.append(path)
            captures.append(reuse_capture(first, path, records[path]))
            continue
        if first is None:
            try:
                first = capture_module(path, module, records[path])
            except Exception as exc:  # noqa: BLE001 - a block export cannot trace is reported, not fatal
                first = TraceFailure(path, type(module).__name__, first_line(exc))
            by_structure[key] = first
            if isinstance(first, CapturedAttention):
                logger.debug("traced %s in %.2f s", path, first.seconds)
                captures.append(first)
                continue
        failure = TraceFailure(path, first.module_type, first.error)
        logger.warning("could not trace %s (%s): %s", path, failure.module_type, failure.error)
        failures.append(failure)
    return CaptureResult(captures, failures, len(candidates), without_attention)


def first_line(exc: Exception) -> str:
    """"ExceptionType: first line of its message" (export's messages run to pages of hints)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().removesuffix(":")


def capture_attention_candidates(model: nn.Module) -> list[CapturedAttention]:
    """The traced candidate blocks of ``model`` (see :func:`capture_candidates` for the failures too)."""
    return capture_candidates(model).captures


def argument_leaf(arguments: dict[str, Any], name: str, leaf: int | None) -> Any:
    """One graph input out of a call's arguments: the argument itself, or its ``leaf``-th pytree tensor leaf."""
    value = arguments[name]
    return value if leaf is None else pytree.tree_leaves(value)[leaf]


def recorded_inputs(capture: CapturedAttention) -> list[Any]:
    """The user inputs of the recorded call, in the order of the graph's placeholders."""
    return [argument_leaf(capture.example_arguments, name, leaf) for name, leaf in capture.user_inputs]


def recorded_call(capture: CapturedAttention) -> CallRecord:
    """The call a capture was traced from (to trace the same block again)."""
    return CallRecord(capture.example_arguments, capture.output_arity)


def reuse_capture(first: CapturedAttention, path: str, record: CallRecord) -> CapturedAttention:
    """Another layer of the same structure: the first one's graph, this layer's own recorded call."""
    return replace(first, module_path=path, seconds=0.0, example_arguments=record.arguments, shared_with=[])
