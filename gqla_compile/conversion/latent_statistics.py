"""Calibration statistics of the latent blocks: the weighted second moments of each block's latent (and, for
``score_aware``, of its no-RoPE queries), float64, summed over calibration tokens by forward hooks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import DEFAULT_BATCH_SIZE, padded_batches
from .latent_blocks import LatentBlock

__all__ = ["LatentStatistics", "collect_latent_statistics", "query_linear"]


@dataclass
class LatentStatistics:
    latent: list[torch.Tensor]  # per layer E_w[c c^T] [d_c, d_c] float64
    query: list[torch.Tensor] | None  # per layer E_w[q^n_h q^n_h^T] [n_h, d_n, d_n] (score_aware only)
    tokens: int
    weight_sum: float


def query_linear(attention: nn.Module) -> nn.Linear:
    """The Linear whose output is the block's queries (q_proj, or q_b_proj after a query LoRA)."""
    return attention.q_proj if getattr(attention, "q_proj", None) is not None else attention.q_b_proj


@torch.no_grad()
def collect_latent_statistics(
    model: nn.Module,
    blocks: Sequence[LatentBlock],
    sequences: Sequence[torch.Tensor],
    *,
    weighting: str | None = None,
    queries: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> LatentStatistics:
    """Weighted second moments of the latents (and of the no-RoPE queries) of every block, float64.

    Hooks on each block's latent (the output of ``kv_a_layernorm``, or the first d_c outputs of
    ``kv_a_proj_with_mqa`` when there is no norm) keep the current batch; after the forward the token weights
    (padding mask, times the next-token loss with ``weighting="loss"``) are known and the moments are summed.
    """
    stash: dict[tuple[int, str], torch.Tensor] = {}
    handles = _stash_hooks(blocks, stash, queries)
    latent = [torch.zeros(b.dims.d_c, b.dims.d_c, dtype=torch.float64) for b in blocks]
    query = [torch.zeros(b.dims.n_h, b.dims.d_n, b.dims.d_n, dtype=torch.float64) for b in blocks] if queries else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens, weight_sum = 0, 0.0
    n_batches = -(-len(sequences) // batch_size)
    try:
        for ids, mask in tqdm(padded_batches(sequences, batch_size), total=n_batches, desc="calibration", unit="batch",
                              disable=not progress):
            stash.clear()
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            weights = mask.to(torch.float64)
            if weighting == "loss":
                weights = weights * _loss_weights(out.logits, ids.to(out.logits.device), mask)
            flat = weights.reshape(-1)
            tokens += int(mask.sum())
            weight_sum += float(flat.sum())
            for i in range(len(blocks)):
                c = stash[(i, "c")].reshape(-1, blocks[i].dims.d_c)
                latent[i] += (c * flat[:, None]).T @ c
                if queries:
                    q = stash[(i, "q")].reshape(flat.shape[0], blocks[i].dims.n_h, -1)
                    query[i] += torch.einsum("t,thd,the->hde", flat, q, q)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    scale = 1.0 / max(weight_sum, 1e-300)
    return LatentStatistics(
        latent=[m * scale for m in latent], query=[m * scale for m in query] if queries else None,
        tokens=tokens, weight_sum=weight_sum,
    )


def _stash_hooks(blocks: Sequence[LatentBlock], stash: dict[tuple[int, str], torch.Tensor], queries: bool) -> list:
    """Forward hooks that put each block's latent (key (i, "c")) and, with ``queries``, its no-RoPE queries
    (key (i, "q")) of the current batch into ``stash``, float64 on CPU; the handles, to remove them."""
    handles = []

    def keep(key, width=None, view=None):
        def hook(_module, _args, output):
            out = output[..., :width] if width is not None else output
            if view is not None:
                out = out.reshape(*out.shape[:-1], view[0], view[1])[..., : view[2]]
            stash[key] = out.detach().to("cpu", torch.float64)
        return hook

    for i, block in enumerate(blocks):
        attn, d = block.module, block.dims
        norm = getattr(attn, "kv_a_layernorm", None)
        if isinstance(norm, nn.Module):
            handles.append(norm.register_forward_hook(keep((i, "c"))))
        else:
            handles.append(attn.kv_a_proj_with_mqa.register_forward_hook(keep((i, "c"), width=d.d_c)))
        if queries:
            handles.append(query_linear(attn).register_forward_hook(keep((i, "q"), view=(d.n_h, d.d_qk, d.d_n))))
    return handles


def _loss_weights(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per position, the next-token loss normalised to mean 1 over the batch's scored positions (float64, CPU).

    Positions with no next token (the last real one of each row) get weight 1.
    """
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1).to("cpu", torch.float64)
    scored = (mask[:, 1:] * mask[:, :-1]).to(torch.float64)
    mean = float((nll * scored).sum() / scored.sum().clamp_min(1))
    weights = torch.ones(ids.shape, dtype=torch.float64)
    if mean > 0:
        weights[:, :-1] = torch.where(scored.bool(), nll / mean, torch.ones_like(nll))
    return weights
