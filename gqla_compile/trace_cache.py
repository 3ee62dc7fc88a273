"""The traces of blocks already exported in this process, so that a second model of the same architecture (or
the same model optimized again, for the other path, or converted after being optimized) is not exported again.

A non-strict ``torch.export`` runs the block's Python code on fake tensors: the graph depends on the code, on
every non-tensor attribute of the block and its children (the config included), on the shapes and dtypes of
its parameters, buffers and arguments, and on nothing else (tensor values are fake; a plain tensor attribute,
which export lifts as a constant, is keyed by its values). :func:`trace_key` writes all of that down; a block
holding anything it cannot write down (a hook, a patched ``forward``, an object of an unknown kind) gets no
key and is always traced. A reused trace is the same graph the first export gave, read-only like the graph one
model's layers already share, and every block is still verified against its own original module afterwards.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
from collections import OrderedDict
from typing import Any, Callable, TypeVar

import torch
from torch import nn
from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

#: Module internals written down otherwise (parameters, buffers and children by their own entries).
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
#: A plain tensor attribute up to this many elements is keyed by its values; a larger one makes a block unkeyed.
_MAX_CONSTANT_ELEMENTS = 4096

T = TypeVar("T")


class _Unkeyable(Exception):
    """Something a trace may depend on that :func:`trace_key` cannot write down."""


def _plain(value: Any) -> Any:
    """``value`` as hashable plain data that is equal exactly when export would see the same thing."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return (type(value).__name__, value)
    if isinstance(value, enum.Enum):
        return ("enum", type(value), value.name)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_plain(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted((_plain(v) for v in value), key=repr)))
    if isinstance(value, dict):
        return ("dict", type(value).__name__, tuple((_plain(k), _plain(v)) for k, v in value.items()))
    if isinstance(value, nn.Module):
        return ("module", type(value))  # keyed by its own entry
    if isinstance(value, torch.Tensor):
        if value.numel() > _MAX_CONSTANT_ELEMENTS:
            raise _Unkeyable(f"a tensor attribute of {value.numel()} elements")
        return ("tensor", tuple(value.shape), value.dtype, tuple(value.detach().cpu().flatten().tolist()))
    if isinstance(value, type) or inspect.isbuiltin(value):
        return ("object", value)  # by identity: a class defined again is another one
    if inspect.isfunction(value):
        if value.__closure__:
            raise _Unkeyable(f"a closure {value.__qualname__}")
        return ("object", value)
    if isinstance(value, PretrainedConfig) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        # every attribute, not only the declared fields: a config may carry attributes set on it later
        state = vars(value) if hasattr(value, "__dict__") else {f.name: getattr(value, f.name)
                                                                 for f in dataclasses.fields(value)}
        return ("object", type(value), _plain(state))
    raise _Unkeyable(f"an attribute of type {type(value).__qualname__}")


def _tensor_spec(value: Any) -> Any:
    """An argument or parameter as export sees it: shape, dtype, device, gradient flag and contiguity."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad, value.is_contiguous())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_tensor_spec(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((_plain(k), _tensor_spec(v)) for k, v in value.items()))
    return _plain(value)


def _module_entry(name: str, module: nn.Module) -> tuple:
    attributes = []
    for attribute, value in vars(module).items():
        if attribute in _MODULE_INTERNALS:
            continue
        if attribute.startswith("_") and isinstance(value, (dict, set)) and not value:
            continue  # empty hook tables and the like
        attributes.append((attribute, _plain(value)))
    tensors = tuple((n, _tensor_spec(t)) for n, t in [*module.named_parameters(recurse=False),
                                                       *module.named_buffers(recurse=False)])
    return (name, type(module), tuple(attributes), tensors)


def trace_key(module: nn.Module, arguments: dict[str, Any], context: Any = ()) -> tuple | None:
    """Everything a non-strict export of ``module`` called with ``arguments`` depends on (``context``: what the
    caller changes around the trace), or None where some of it cannot be written down. Classes and functions
    are keyed by identity, so code defined again is traced again."""
    try:
        modules = tuple(_module_entry(name, m) for name, m in module.named_modules())
        return (modules, _tensor_spec(arguments), _plain(context))
    except _Unkeyable as reason:
        logger.debug("%s is traced afresh: its trace may depend on %s", type(module).__name__, reason)
        return None


class TraceCache:
    """The most recent ``max_size`` traces by :func:`trace_key` (least recently used dropped first)."""

    def __init__(self, max_size: int = 64):
        self.max_size = max_size
        self._traces: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = self.misses = 0

    def get_or_trace(self, key: tuple | None, trace: Callable[[], T]) -> tuple[T, bool]:
        """The trace under ``key`` and True, or ``trace()`` (kept under ``key`` unless None) and False."""
        if key is not None and key in self._traces:
            self._traces.move_to_end(key)
            self.hits += 1
            return self._traces[key], True
        self.misses += 1
        traced = trace()
        if key is not None:
            self._traces[key] = traced
            while len(self._traces) > self.max_size:
                self._traces.popitem(last=False)
        return traced, False

    def clear(self) -> None:
        self._traces.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._traces)


#: This process's traces, shared by optimize and convert (``TRACES.clear()`` frees them).
TRACES = TraceCache()
