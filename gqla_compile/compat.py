"""What moved between the transformers releases this package supports (the ones vLLM pins, 5.16.1 on, and the
newest): one name per helper, imported from transformers where it exists and written here where it does not."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

#: The name model outputs give the cache: ``cache`` from transformers 5.20 on, ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

def keep_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of ``hidden_states`` [B, T, D] whose logits are wanted: the last ``logits_to_keep`` (an
    int, 0 for all), the given positions (a 1-D tensor, or [B, k] per sample), or the True positions of a
    [B, T] boolean mask (flattened to [n, D]); transformers' own helper where it has one (5.20 on)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep.unsqueeze(-1), dim=1)
    positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden_states[:, positions, :]


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.20 slices inside each model's forward
    slice_logits_to_keep = keep_positions


def cache_keyword(forward: Callable) -> Callable:
    """``forward(..., cache=...)`` also called as ``past_key_values=...``: a deprecated name from transformers
    5.20 on (transformers warns), the name generate itself passes before (renamed without a word)."""
    if CACHE_FIELD == "cache":
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return renamed


__all__ = ["CACHE_FIELD", "cache_keyword", "keep_positions", "slice_logits_to_keep"]
