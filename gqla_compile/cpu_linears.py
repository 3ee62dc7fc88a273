"""The compiled model's linear layers on CPU through oneDNN, where this CPU runs them faster than MKL.

torch.nn.functional.linear on CPU runs MKL, which on some CPUs takes a slower code path than oneDNN's inner
product (this project's AMD CPU, one thread: a 256 x 1024 x 8192 float32 product 54 ms on MKL, 43 ms on
oneDNN; the decode step's 1 x 1024 x 8192 2.2 ms against 1.5 ms). Which library is faster is measured once
per process (:func:`onednn_is_faster`), and where oneDNN is, :func:`route_linears_to_onednn` rewrites each
linear of a Dynamo graph into one custom op over it, opaque to Inductor, so dynamic shapes stay dynamic.
Inference only: a graph traced with gradients keeps its linears.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import fx

from .kernels import AVAILABLE, DTYPES, inner_product
from .targets import median_seconds

logger = logging.getLogger(__name__)

#: How much faster oneDNN must run the measured products (decode's one row and a prefill's 256) to be used:
#: below it the measurement's noise could pick either.
REQUIRED_SPEEDUP = 1.1
#: Seconds each product is timed for (the median of its runs, at least 3).
MEASURE_S = 0.02


@torch.library.custom_op("gqla_compile::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN's inner product: x [..., K], weight [N, K] with dense rows."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return F.linear(x, weight, bias)
    out = inner_product(rows.contiguous(), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@functools.lru_cache(maxsize=None)
def onednn_is_faster(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN runs a linear layer's product at least REQUIRED_SPEEDUP times faster than MKL here, for
    one row (a decode step) and for 256 (a prefill), on this process's threads; measured once (about 0.15 s)."""
    if not AVAILABLE or dtype not in DTYPES:
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2048, 1024, generator=generator).to(dtype)
    speedups = []
    for rows in (1, 256):
        x = torch.randn(rows, 1024, generator=generator).to(dtype)
        with torch.no_grad():
            mkl = median_seconds(lambda: F.linear(x, weight), MEASURE_S)
            onednn = median_seconds(lambda: inner_product(x, weight), MEASURE_S)
        speedups.append(mkl / onednn)
    faster = min(speedups) >= REQUIRED_SPEEDUP
    logger.info("linear layers on CPU, %s: oneDNN %s MKL (%s)", dtype, "beats" if faster else "does not beat",
                ", ".join(f"{rows} rows {s:.2f}x" for rows, s in zip((1, 256), speedups)))
    return faster


def _routable(node: fx.Node) -> bool:
    """A CPU linear of a float type oneDNN takes, with a weight of dense rows."""
    if node.op != "call_function" or node.target is not torch._C._nn.linear:
        return False
    x, weight = (arg.meta.get("example_value") if isinstance(arg, fx.Node) else None for arg in node.args[:2])
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return False
    return (x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and weight.is_contiguous() and onednn_is_faster(x.dtype))


def route_linears_to_onednn(gm: fx.GraphModule) -> int:
    """Rewrite, in place, each routable linear of a Dynamo graph into ``gqla_compile::onednn_linear``; returns
    how many. A graph traced with gradients enabled is left as it is (the op has no backward)."""
    if torch.is_grad_enabled():
        return 0
    routed = 0
    for node in list(gm.graph.nodes):
        if _routable(node):
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            node.target = torch.ops.gqla_compile.onednn_linear.default
            node.args, node.kwargs = (node.args[0], node.args[1], bias), {}
            routed += 1
    if routed:
        gm.recompile()
    return routed
