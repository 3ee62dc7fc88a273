"""Attention over a layer's cache as the installed runtime computes it: dense and causal, over each query's
selected rows (sparse attention), with learned sinks; and the shortcut for a prefill into an empty cache.

Plain PyTorch (matmuls, softmax, sdpa) that Inductor compiles; the kernels' thin products come from
``kernels``, a long prefill's blocked GEMMs on CPU from ``blocked_attention``. The layouts the functions read are the paths' (``paths.py``), given as key parts and values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .blocked_attention import blocked_attention, supports
from .kernels import SCORE_ROWS_ONEDNN, score_matmul, value_matmul

#: Up to this many new tokens per step, the query heads of a KV group are folded into the query length.
FOLD_QUERY_HEADS_UP_TO = 16
#: One new token per sequence and fewer query heads per cached head than the scores need to run on oneDNN
#: (kernels.SCORE_ROWS_ONEDNN): a contiguous key part (the copied grouped layout, the absorbed latent; not
#: the shared layout's strided views) is scored keys-major, K q^T. MKL streams that thin product about twice
#: as fast as q K^T (one thread, this project's CPU; GPUs keep q K^T, unmeasured there). Several new tokens
#: keep q K^T: Inductor's fused mask-and-softmax kernel reads keys-major scores strided, which cost more than
#: the matmul saved (DeepSeek-V3 shape, s_q 2: 28 ms a step keys-major, 21 ms without).
KEYS_MAJOR_ROWS = SCORE_ROWS_ONEDNN - 1


def _mask_for_no_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """transformers' meaning of a missing mask, as an explicit [T, S] boolean one (sdpa's ``is_causal``): one
    query sees every key; several are causal from the first key (query i sees keys 0..i)."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(0 if t > 1 else s)


def attention_over_cache(query: torch.Tensor, keys: list[torch.Tensor], value: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, sink: torch.Tensor | None = None) -> torch.Tensor:
    """The attention core of a decode step: T queries over S cached tokens, reading the cache as it lies.

    query [B, n_h, T, sum of the key parts' dims]; ``keys``: the cached key parts, [B, h_i, S, d_i] each,
    h_i dividing n_h (query head h reads KV head h // (n_h / h_i)); the score is the sum over the parts of
    q[..., part] . k_part, so a RoPE key kept once ([B, 1, S, d_R]) is scored against every group without
    being copied. value [B, h_v, S, d_v] (any strides with a unit last stride: a slice of the key is read
    as a view). ``mask``: None (every key), a boolean [.., T, S] (True: attend) or an additive float mask,
    broadcastable to [B, n_h, T, S]; a token selection (sparse attention) is one more such mask. ``sink``:
    optional learned attention sinks [n_h], one logit per query head in the softmax's denominator (probability
    mass that reads no value), as :func:`softmax_with_sink` applies them.

    Each part folds the query heads that share a KV head into the query length ([B, h_i, n_h / h_i * T,
    d_i]), so every cached row is read once for all its heads, as MQA/GQA decode kernels do; plain PyTorch
    (matmuls, softmax), which Inductor compiles. One token with few heads per cached head is scored
    keys-major (``KEYS_MAJOR_ROWS``). Returns [B, n_h, T, d_v].
    """
    batch, heads, t, _ = query.shape
    s = value.shape[-2]
    scores = None
    offset = 0
    for part in keys:
        dims, kv_heads = part.shape[-1], part.shape[1]
        folded = query[..., offset : offset + dims].unflatten(1, (kv_heads, -1)).flatten(2, 3)
        if t == 1 and folded.shape[-2] <= KEYS_MAJOR_ROWS and part.is_contiguous() and part.device.type == "cpu":
            part_scores = score_matmul(part, folded.transpose(-1, -2), folded.shape[-2]).transpose(-1, -2)
        else:
            part_scores = score_matmul(folded, part.transpose(-1, -2), folded.shape[-2])
        part_scores = part_scores.reshape(batch, heads, t, s)
        scores = part_scores if scores is None else scores + part_scores
        offset += dims
    scores = scores * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = softmax_with_sink(scores, sink).to(value.dtype)
    kv_heads = value.shape[1]
    out = value_matmul(probs.view(batch, kv_heads, heads // kv_heads * t, s), value)
    return out.view(batch, heads, t, value.shape[-1])


def softmax_with_sink(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of scores [B, n_h, T, S] in float32; with learned sinks [n_h], each head's
    sink logit joins the row as one more column that is dropped after the softmax (as the families do)."""
    if sink is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    column = sink.to(scores.dtype).view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
    return torch.softmax(torch.cat([scores, column], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]


def selected_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    indices: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    dense: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Sparse attention: each query reads only its selected cached rows (a top-k token selection, DSA).

    ``key`` / ``value``: one layer's cached tensors [B, h, S, d] in the path's layout; ``indices`` [B, T, k]
    the selected positions of each query. The selected rows are gathered ([B T, h, k, d]; for the absorbed
    path that is k latents [c ; k_R], for the grouped one k per-group keys and values) together with the
    mask's values there, and each query attends over its own k rows with ``attend(query, key, value, mask)``
    (the dense core, one query per gathered batch row): the cost of a step grows with k, not with S.
    Indices outside the cache select nothing (transformers' -1); a query's indices do not repeat (see
    :meth:`TokenSelection.forward`).
    """
    batch, heads, t, _ = query.shape
    s = key.shape[-2]
    if attention_mask is None:
        attention_mask = _mask_for_no_mask(t, s, query.device)
    mask = attention_mask[..., :s]
    mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, -1, t, s)  # [B, h_m, T, S]
    index = indices.long()
    counted = (index >= 0) & (index < s)  # an index outside the cache selects nothing
    index = index.clamp(0, s - 1)
    if t > FOLD_QUERY_HEADS_UP_TO:
        selected = torch.zeros(batch, 1, t, s, dtype=torch.int32, device=query.device)
        selected = selected.scatter_add(-1, index.unsqueeze(1), counted.unsqueeze(1).int()) > 0
        return dense(_restricted(mask, selected))
    rows = torch.arange(batch, device=key.device).view(batch, 1, 1)

    def gather(cached: torch.Tensor) -> torch.Tensor:  # [B, h, S, d] -> [B T, h, k, d]
        return cached[rows, :, index].transpose(2, 3).flatten(0, 1)

    selected_mask = mask.gather(-1, index.unsqueeze(1).expand(-1, mask.shape[1], -1, -1))  # [B, h_m, T, k]
    selected_mask = _restricted(selected_mask, counted.unsqueeze(1))
    out = attend(
        query.transpose(1, 2).flatten(0, 1).unsqueeze(2),  # [B T, n_h, 1, d]
        gather(key),
        gather(value),
        selected_mask.transpose(1, 2).flatten(0, 1).unsqueeze(2),  # [B T, h_m, 1, k]
    )
    return out.squeeze(2).unflatten(0, (batch, t)).transpose(1, 2)


def without_repeats(indices: torch.Tensor) -> torch.Tensor:
    """A query's selected positions, each once: a repeat becomes -1 (selects nothing), as the family's
    scatter into its mask counts a token once however often it is listed. The order changes (sorted)."""
    index = indices.sort(-1).values
    repeated = torch.cat([torch.zeros_like(index[..., :1], dtype=torch.bool), index[..., 1:] == index[..., :-1]],
                         dim=-1)
    return index.masked_fill(repeated, -1)


def _restricted(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A boolean or additive mask with the positions where ``keep`` is False masked too."""
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def causal_attention(query: torch.Tensor, keys: list[torch.Tensor], value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scale: float, sink: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of T new queries over S cached keys (the last T of which are the new ones).

    ``keys`` and ``value`` as :func:`attention_over_cache` takes them. ``attention_mask`` is what
    transformers prepared for the model's attention implementation (boolean for sdpa, additive for eager).
    Without one, the semantics are transformers' own for sdpa: one query sees every key, several are causal
    from the first key (``is_causal``, top-left). transformers leaves the mask out only where that is
    right: a prefill into an empty cache (a StaticCache's unwritten slots come after the queries) or as
    many keys as queries.

    Decoding (T up to FOLD_QUERY_HEADS_UP_TO) runs :func:`attention_over_cache` on the cache's own views.
    Prefill joins the key parts into one key per KV head: there the cost is the T x S scores, not the cache
    read. On CPU it runs :func:`blocked_attention.blocked_attention` (GEMMs over the columns each query block
    sees; sinks included); elsewhere sdpa, which broadcasts the key and never materialises the scores (with
    ``sink``, which sdpa lacks, :func:`attention_over_cache`).
    """
    t, s = query.shape[-2], value.shape[-2]
    mask = None if attention_mask is None else attention_mask[..., :s]
    if t > FOLD_QUERY_HEADS_UP_TO:  # both kernels read a missing mask as top-left causal
        kv_heads = max(part.shape[1] for part in keys)
        key = torch.cat([part.expand(-1, kv_heads, -1, -1) for part in keys], dim=-1) if len(keys) > 1 else keys[0]
        values = value.expand(-1, kv_heads, -1, -1)
        if supports(query, key, values):
            return blocked_attention(query, key, values, mask, scale, sink)
        if sink is None:
            return F.scaled_dot_product_attention(query, key, values, attn_mask=mask, is_causal=mask is None,
                                                  scale=scale, enable_gqa=True)
    if mask is None and t > 1:
        mask = _mask_for_no_mask(t, s, query.device)
    return attention_over_cache(query, keys, value, mask, scale, sink)


def is_prefill_into_empty_cache(mask: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Whether ``mask`` (boolean, or additive with 0 to attend and the dtype's minimum to mask) lets query i see
    exactly keys 0..i of the S keys, for every sequence: T queries into a cache whose other rows are unwritten
    (a StaticCache's first call). Then attention over the first T rows with sdpa's ``is_causal`` is the same
    computation. A 0-d boolean tensor (the mask is data)."""
    mask = mask[..., :s]
    allowed = mask if mask.dtype == torch.bool else mask == 0
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    # counted, not reduced with all(): Inductor's CPU code generator fails on a boolean all() over this
    wrong = torch.logical_xor(allowed[..., :t], causal).sum() + allowed[..., t:].sum()
    if mask.dtype != torch.bool:  # an additive mask: every value 0 or masked (no bias values, such as ALiBi's)
        wrong = wrong + (~(allowed | (mask <= torch.finfo(mask.dtype).min / 2))).sum()
    return wrong == 0


def branch_on(predicate: torch.Tensor, if_true: Callable, if_false: Callable, operands: tuple) -> torch.Tensor:
    """``if_true(*operands)`` where the 0-d boolean ``predicate`` holds, else ``if_false(*operands)``: a Python
    branch when eager, ``torch.cond`` under torch.compile (one graph holds both, no graph break)."""
    if torch.compiler.is_compiling():
        return torch.cond(predicate, if_true, if_false, operands)
    return if_true(*operands) if bool(predicate) else if_false(*operands)
