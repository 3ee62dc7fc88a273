"""Compile: hand the rewritten model to Inductor through ``torch.compile``, counting what it did.

On CPU the graphs' linear layers run on oneDNN where it is measured faster than MKL (``cpu_linears``).
Graph breaks are counted (dynamo's own counters) and reported, not hidden; so is a fall back to eager
(dynamo's recompile limit hit on a call of this model: the call runs uncompiled, which dynamo only logs). If
Inductor fails, the error names the attention blocks in the failing graph and says to retry with
``optimize(..., compile=False)``.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .cpu_linears import route_linears_to_onednn
from .errors import CompileError

logger = logging.getLogger(__name__)

_RECOMPILE_LIMIT = 64


@dataclass
class CompileStats:
    """Filled in as dynamo hands graphs to the backend (compilation is lazy: first calls)."""

    backend: str = "inductor"
    graphs: int = 0
    seconds: float = 0.0
    graph_breaks_before: int = 0
    graph_sizes: list[int] = field(default_factory=list)
    eager_fallbacks: list[str] = field(default_factory=list)  # why calls of this model ran uncompiled
    onednn_linears: int = 0  # linear layers routed to oneDNN over all graphs (cpu_linears)

    @property
    def fell_back_to_eager(self) -> bool:
        return bool(self.eager_fallbacks)

    @property
    def graph_breaks(self) -> int:
        return _graph_break_count() - self.graph_breaks_before

    def to_dict(self) -> dict:
        return {"backend": self.backend, "graphs": self.graphs, "seconds": round(self.seconds, 3),
                "graph_breaks": self.graph_breaks, "graph_sizes": list(self.graph_sizes),
                "eager_fallbacks": list(self.eager_fallbacks), "onednn_linears": self.onednn_linears}


def _graph_break_count() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


class _RecompileLimitLog(logging.Handler):
    """Collects dynamo's "hit config.recompile_limit" warnings: the only trace of a frame sent back to eager."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message:
            self.messages.append(" ".join(message.split("\n")[:2]).strip())


_RECOMPILE_LIMIT_LOG = _RecompileLimitLog()
logging.getLogger("torch._dynamo.convert_frame").addHandler(_RECOMPILE_LIMIT_LOG)


def compile_model(model: nn.Module, *, backend: str = "inductor") -> CompileStats:
    """Wrap ``model.forward`` with torch.compile(Inductor); generate and direct calls both go through it.

    ``backend`` other than "inductor" (dynamo's "eager", "aot_eager") is for debugging the capture alone.
    """
    stats = CompileStats(backend=backend, graph_breaks_before=_graph_break_count())

    def inductor_backend(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        start = time.perf_counter()
        stats.onednn_linears += route_linears_to_onednn(gm)
        try:
            compiled = compile_fx(gm, example_inputs)
        except (torch._dynamo.exc.TorchDynamoException, IndexError):
            # Dynamo's own signals (a restart after a scalar became a tensor, a skipped frame) and the user's dim
            # errors, which Dynamo passes on as they are: wrapping them would turn a restart into a failure
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the blocks named
            blocks = sorted({str(v[0]) for n in gm.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).values()
                             if "attn" in str(v[0])})[:4]
            raise CompileError(
                f"Inductor failed on a graph holding {', '.join(blocks) or 'the model'}: {type(exc).__name__}: {exc}. "
                "Retry with gqla_compile.optimize(model, ..., compile=False)"
            ) from exc
        stats.graphs += 1
        stats.seconds += time.perf_counter() - start
        stats.graph_sizes.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"))
        return compiled

    # Every optimized model compiles its own graphs (prefill, first decode, dynamic decode) under the same
    # transformers forward code object; dynamo's default limit of 8 per code object would send the third
    # optimized model in a process back to eager without a word.
    if torch._dynamo.config.recompile_limit < _RECOMPILE_LIMIT:
        logger.info("raising torch._dynamo.config.recompile_limit to %d", _RECOMPILE_LIMIT)
        torch._dynamo.config.recompile_limit = _RECOMPILE_LIMIT
    compiled = torch.compile(model.forward, backend=inductor_backend if backend == "inductor" else backend)

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        seen = len(_RECOMPILE_LIMIT_LOG.messages)
        try:
            # Python floats (softmax scales, norm epsilons) stay constants: once Dynamo's automatic dynamic saw
            # two models' scales under the shared forward code, it traced them as SymFloats, which torch.cond's
            # branches then shared across their subgraphs and Dynamo failed ("lift_tracked_freevar_to_input")
            with torch._dynamo.config.patch(specialize_float=True):
                return compiled(*args, **kwargs)
        finally:
            for message in _RECOMPILE_LIMIT_LOG.messages[seen:]:
                logger.warning("%s: a call fell back to eager: %s", type(model).__name__, message)
                stats.eager_fallbacks.append(message)

    model.forward = forward
    return stats
