"""Capture of a block whose child module reads the cache itself (a sparse-attention indexer that keeps its own
keys and its own idea of the cache length): such a block cannot be traced without a cache, so
:func:`retrace_with_stateful_children` traces it again with each of those children as one opaque op
(``gqla_compile::stateful_child``: its tensor arguments in, its recorded output's shape out), which the installed
runtime replaces by a call of the child itself, with the real cache.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .capture import (CACHE_ARGUMENTS, RECORD_BATCH, RECORD_SEQ, CallRecord, CapturedAttention, bind_arguments,
                      capture_module, first_line, recorded_call, reuse_capture)
from .stateful_op import BATCH_OF_FIRST_INPUT, SEQ_OF_FIRST_INPUT, stateful_child

logger = logging.getLogger(__name__)


def stateful_children(module: nn.Module) -> dict[str, nn.Module]:
    """The block's child modules whose forward takes a cache argument (an indexer with a cache of its own)."""
    return {name: child for name, child in module.named_modules()
            if name and any(arg in inspect.signature(child.forward).parameters for arg in CACHE_ARGUMENTS)}


@dataclass
class StatefulChildCall:
    """How a block called one stateful child during its recorded call: tensor arguments by name (the first
    one [batch, seq, ...]), and its output's shape and dtype (batch and seq dims as the markers above)."""

    arguments: list[str]
    shape: list[int]
    dtype: torch.dtype


def _record_stateful_calls(module: nn.Module, children: dict[str, nn.Module],
                           record: CallRecord) -> dict[str, StatefulChildCall]:
    """Run the block once on its recorded call and note how it calls each stateful child."""
    calls: dict[str, StatefulChildCall] = {}
    handles = []

    def hook(name: str, child: nn.Module):
        signature = inspect.signature(child.forward)

        def record_call(_child, args, kwargs, output):
            bound = bind_arguments(signature, args, kwargs)
            tensors = {k: v for k, v in bound.items() if k not in CACHE_ARGUMENTS and v is not None}
            if any(not isinstance(v, torch.Tensor) for v in tensors.values()) or not isinstance(output, torch.Tensor):
                raise TypeError(f"{name} reads the cache and takes or returns something other than tensors; "
                                "only tensor arguments and one tensor output can be kept as an opaque call")
            first = next((k for k, v in tensors.items() if v.dim() >= 2 and tuple(v.shape[:2]) == (RECORD_BATCH, RECORD_SEQ)),
                         None)
            if first is None:
                raise TypeError(f"{name} reads the cache but takes no [batch, seq, ...] tensor")
            order = [first, *(k for k in tensors if k != first)]
            marks = {0: BATCH_OF_FIRST_INPUT, 1: SEQ_OF_FIRST_INPUT}
            shape = [marks[i] if i < 2 and size == (RECORD_BATCH, RECORD_SEQ)[i] else int(size)
                     for i, size in enumerate(output.shape)]
            calls[name] = StatefulChildCall(order, shape, output.dtype)

        return record_call

    for name, child in children.items():
        handles.append(child.register_forward_hook(hook(name, child), with_kwargs=True))
    try:
        with torch.no_grad():
            module(**{k: v for k, v in record.arguments.items() if k not in CACHE_ARGUMENTS})
    finally:
        for handle in handles:
            handle.remove()
    return calls


class OpaqueChildren:
    """While tracing, each stateful child's forward is the opaque op (restored on exit)."""

    def __init__(self, children: dict[str, nn.Module], calls: dict[str, StatefulChildCall]):
        self.children, self.calls = children, calls

    def __enter__(self):
        for name, child in self.children.items():
            child.forward = self._opaque(name, inspect.signature(child.forward), self.calls[name])
        return self

    def __exit__(self, *exc):
        for child in self.children.values():
            del child.forward

    def key(self) -> tuple:
        """What the trace depends on besides the block: each opaque child's arguments and output."""
        return tuple((name, tuple(call.arguments), tuple(call.shape), call.dtype)
                     for name, call in self.calls.items() if name in self.children)

    @staticmethod
    def _opaque(name: str, signature: inspect.Signature, call: StatefulChildCall):
        def forward(*args, **kwargs):
            bound = bind_arguments(signature, args, kwargs)
            inputs = [bound[argument] for argument in call.arguments]
            return stateful_child(inputs, name, ",".join(call.arguments), call.shape, call.dtype)

        return forward


def retrace_with_stateful_children(capture: CapturedAttention, module: nn.Module,
                                   traced: dict[tuple, CapturedAttention | None]) -> CapturedAttention | None:
    """``capture``'s block traced again with each child that reads the cache as one opaque op (see the module
    docstring); None when it has none or that trace failed (logged). ``traced`` holds one trace per block
    structure, for the caller to share between layers."""
    children = stateful_children(module)
    if not children:
        return None
    key, record = capture.structure_key, recorded_call(capture)
    if key not in traced:
        try:
            calls = _record_stateful_calls(module, children, record)
            opaque = OpaqueChildren({n: c for n, c in children.items() if n in calls}, calls)
            traced[key] = capture_module(capture.module_path, module, record, opaque_children=opaque)
        except Exception as exc:  # noqa: BLE001 - the caller keeps the first trace's result
            logger.warning("%s: tracing its cache-reading child modules as opaque calls failed: %s",
                           capture.module_path, first_line(exc))
            traced[key] = None
    first = traced[key]
    return None if first is None else reuse_capture(first, capture.module_path, record)
