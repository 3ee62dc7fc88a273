"""The opaque op ``gqla_compile::stateful_child``: a child module that reads the cache, as one call in a graph.

A sparse-attention indexer that keeps its own keys and its own idea of the cache length cannot be traced
without a cache. Capture (:func:`~gqla_compile.capture_stateful.retrace_with_stateful_children`) traces its block with
the child replaced by this op (its tensor arguments in, its recorded output's shape out); detection
(passes/selection.py) recognises the op as a token selection's source; the installed runtime calls the child
itself. The op is registered with torch when this module is imported, so each of those modules imports it
from here: the op they name exists because they import it, not because of another module's import order.
"""

from __future__ import annotations

import torch

__all__ = ["BATCH_OF_FIRST_INPUT", "SEQ_OF_FIRST_INPUT", "STATEFUL_CHILD", "stateful_child"]

#: In a stateful child's recorded output shape: this dim is the batch (or sequence) dim of its first input.
BATCH_OF_FIRST_INPUT, SEQ_OF_FIRST_INPUT = -1, -2


@torch.library.custom_op("gqla_compile::stateful_child", mutates_args=())
def stateful_child(inputs: list[torch.Tensor], child: str, arguments: str, shape: list[int],
                   dtype: torch.dtype) -> torch.Tensor:
    """Stands for the call of a child module that reads the cache (``child``, its path in the block), with
    the tensors ``inputs`` passed as the comma-separated ``arguments``. Only traced, never run: the runtime
    calls the child itself."""
    raise RuntimeError(f"gqla_compile::stateful_child stands for {child} in a traced graph and cannot run; "
                       "the installed runtime calls the module itself")


@stateful_child.register_fake
def _stateful_child_shape(inputs, child, arguments, shape, dtype):
    first = inputs[0]
    sizes = {BATCH_OF_FIRST_INPUT: first.shape[0], SEQ_OF_FIRST_INPUT: first.shape[1]}
    return first.new_empty([sizes.get(d, d) for d in shape], dtype=dtype)


#: The op as it appears in a traced graph (a node's ``target``).
STATEFUL_CHILD = torch.ops.gqla_compile.stateful_child.default
