"""How every rewrite and conversion checks itself: the relative error of its output against the original's,
and the bound that error must stay within (one bound per precision, the same everywhere).

In bfloat16/float16 the original's own output carries its dtype's rounding, which a rewrite with other
(folded) weights does not repeat: the two can differ by more than the bound while the rewrite is as close to
the exact result as the original is. :func:`half_precision_verdict` settles that case against the original run
in float32."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

#: float32/float64 models: rewrites and exact conversions reorder sums only.
FULL_PRECISION_TOLERANCE = 1e-4
#: bfloat16/float16 models: the same reordering, at about 3 significant digits per element.
HALF_PRECISION_TOLERANCE = 3e-2
#: The dtypes whose own rounding :func:`half_precision_verdict` allows for.
HALF_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, in float64."""
    expected = expected.double()
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def reproduction_tolerance(dtype: torch.dtype) -> float:
    """The largest relative error a model of ``dtype`` may show and still count as reproduced."""
    return FULL_PRECISION_TOLERANCE if dtype in (torch.float32, torch.float64) else HALF_PRECISION_TOLERANCE


def half_precision_verdict(module: nn.Module, run: Callable[[nn.Module, Callable], torch.Tensor],
                           got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(error, bound) of a half-precision rewrite's output ``got`` measured against ``module`` run in float32:
    ``run(module, cast)`` calls a module on its arguments passed through ``cast`` (here: floating tensors to
    float32). The bound is the larger of HALF_PRECISION_TOLERANCE and twice the original's own error in its
    dtype (``expected``) against that float32 reference."""
    upcast = copy.deepcopy(module).float()
    with torch.no_grad():
        reference = run(upcast, to_float32)
    return relative_error(got, reference), max(HALF_PRECISION_TOLERANCE, 2 * relative_error(expected, reference))


def to_float32(arguments: Any) -> Any:
    """Call arguments with every floating tensor in float32 (others, and non-tensors, as they are)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.is_floating_point() else t, arguments)
