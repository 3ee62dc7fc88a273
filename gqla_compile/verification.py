"""How every rewrite and conversion checks itself: the relative error of its output against the original's,
and the bound that error must stay within (one bound per precision, the same everywhere); and
:func:`verify_rewrite`, the check of one rewritten attention block against the original block.

In bfloat16/float16 the original's own output carries its dtype's rounding, which a rewrite with other
(folded) weights does not repeat: the two can differ by more than the bound while the rewrite is as close to
the exact result as the original is. :func:`half_precision_verdict` settles that case against the original run
in float32."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree
from transformers import DynamicCache, PretrainedConfig

from .capture import CACHE_ARGUMENTS, CapturedAttention
from .errors import VerificationError
from .forms import FormChoice
from .runtime import InstalledLatentAttention

logger = logging.getLogger(__name__)

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


def verify_rewrite(module: nn.Module, runtime: InstalledLatentAttention, capture: CapturedAttention) -> float:
    """Relative error of the rewritten block against the original on the recorded call, run twice: whole, with
    no cache, and as a prefill of all but its last token into a fresh cache, then that token decoded from it
    (what generate does; :func:`_decode_split`), each in every compute form of the core; the largest error. In half precision, where the two differ by
    more than the bound, each is judged against the original run in float32
    (:func:`half_precision_verdict`)."""
    arguments = {k: v for k, v in capture.example_arguments.items() if k not in CACHE_ARGUMENTS}
    hidden = next(v for v in arguments.values() if isinstance(v, torch.Tensor) and v.dim() == 3)
    seq = hidden.shape[1]
    if not isinstance(arguments.get("attention_mask"), torch.Tensor):
        # An explicit additive causal mask: eager attention implementations treat "no mask" as bidirectional.
        causal = torch.full((seq, seq), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device).triu(1)
        arguments["attention_mask"] = causal.expand(hidden.shape[0], 1, seq, seq)

    def whole(block: nn.Module, cast) -> torch.Tensor:
        return _first(block(**cast(arguments)))

    split = _decode_split(module, arguments, seq)
    errors = []
    with contextlib.closing(_each_compute_form(runtime)) as forms:  # the core's own rule back, also on an error
        for how in forms:
            errors.append(_verified_error(module, runtime, whole, capture.module_path, how))
            if split is not None:
                decoding = _verified_error(module, runtime, split, capture.module_path,
                                           f"{how} decoding from its cache", unless_original_fails=True)
                errors += [] if decoding is None else [decoding]
    return max(errors)


def _each_compute_form(runtime: InstalledLatentAttention):
    """Runs the checks once per compute form of the core, each forced for every call (the rule picks by length,
    and the recorded call's length need not reach every form); yields how each is named in an error."""
    choice = runtime.core.forms
    if choice is None or len(choice.forms) == 1:
        yield ""
        return
    try:
        for form in choice.forms:
            runtime.core.forms = FormChoice((form,))
            yield f" in the {form.name} compute form"
    finally:
        runtime.core.forms = choice


def _verified_error(module: nn.Module, runtime: InstalledLatentAttention, run, module_path: str, how: str, *,
                    unless_original_fails: bool = False) -> float | None:
    """``run(block, cast)`` on the original and on the rewrite: their relative error, or VerificationError.
    ``unless_original_fails``: None (logged) where the original block itself cannot make that call."""
    with torch.no_grad():
        try:
            expected = run(module, lambda a: a)
        except Exception as exc:  # noqa: BLE001 - the check is skipped, and says so
            if not unless_original_fails:
                raise
            logger.info("%s: not checked%s (the original block fails that call: %s: %s)", module_path, how,
                        type(exc).__name__, exc)
            return None
        got = run(runtime, lambda a: a)
    if expected.shape != got.shape:
        raise VerificationError(
            f"{module_path}: rewritten output{how} has shape {tuple(got.shape)}, original {tuple(expected.shape)}"
        )
    error = relative_error(got, expected)
    tolerance = reproduction_tolerance(expected.dtype)
    if not error <= tolerance and expected.dtype in HALF_PRECISION_DTYPES:
        error, tolerance = half_precision_verdict(module, run, got, expected)
    if not error <= tolerance:
        raise VerificationError(
            f"{module_path}: the rewritten attention{how} differs from the original (relative error "
            f"{error:.2e} > {tolerance:.1e}); the model was left unchanged. Please report this model"
        )
    return error


def _decode_split(module: nn.Module, arguments: dict[str, Any], seq: int):
    """The recorded call as generate makes it: all but the last token into a fresh ``DynamicCache`` (built from
    the block's config where it has one, as generate builds it: a sparse indexer's key cache included), then
    the last token; ``run(block, cast)`` returning the last token's output. None where that cannot be set up
    from the call alone: the block takes no cache argument, or a tensor has several sequence-sized dims or is
    an index into the sequence. (A block that does not run on that cache is skipped by the caller.)"""
    parameters = inspect.signature(module.forward).parameters
    cache_name = next((name for name in CACHE_ARGUMENTS if name in parameters), None)
    if cache_name is None or seq < 2:
        return None

    try:
        prefill, last = _cut_call(arguments, seq, 0, seq - 1), _cut_call(arguments, seq, seq - 1, seq)
    except _Ambiguous:
        return None

    config = getattr(module, "config", None)  # the model's cache layers (a sparse indexer's key cache among them)

    def run(block: nn.Module, cast) -> torch.Tensor:
        cache = DynamicCache(config=config) if isinstance(config, PretrainedConfig) else DynamicCache()
        block(**cast(prefill), **{cache_name: cache})
        return _first(block(**cast(last), **{cache_name: cache}))

    return run


#: Integer arguments that give each token's position: cut with the tokens (other integer tensors that run along
#: the sequence, such as a previous layer's top-k key indices, hold positions the cut would invalidate).
POSITION_ARGUMENTS = ("position_ids", "cache_position")


def _cut_call(arguments: dict[str, Any], seq: int, start: int, stop: int) -> dict[str, Any]:
    """The call's arguments for tokens start..stop of its ``seq``: every tensor cut along its one sequence-sized
    dim, a [.., queries, keys] mask to these queries over every key so far; _Ambiguous where that is unknown."""

    def cut(name: str, t: torch.Tensor) -> torch.Tensor:
        if name == "attention_mask" and t.dim() > 2:
            return t[..., start:stop, :stop]
        dims = [d for d, size in enumerate(t.shape) if size == seq]
        if len(dims) > 1 or (dims and _is_index(t) and name not in POSITION_ARGUMENTS):
            raise _Ambiguous  # which dim to cut, or what the values index (a shared top-k selection)
        return t.narrow(dims[0], start, stop - start) if dims else t

    return {name: pytree.tree_map_only(torch.Tensor, functools.partial(cut, name), value)
            for name, value in arguments.items()}


def _is_index(t: torch.Tensor) -> bool:
    """Integer values (positions or indices); floats, complex RoPE factors and boolean masks are not."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class _Ambiguous(Exception):
    """A recorded tensor that cannot be cut into prefill and last token from the call alone."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output
