"""Attention of many new tokens on CPU as GEMMs: each block of query rows against the key columns it can see.

sdpa's CPU kernel runs a long causal prefill well below the machine's GEMM rate (one thread, DeepSeek-V3's
head dims, 8k tokens: 17.3 s, where the blocked product below takes 4.3 s). Here each block of QUERY_BLOCK
rows is scored against the columns its mask lets any of its rows see (under a causal mask, the prefix and
the block's own diagonal; a padded sequence's leading columns are skipped), with the kernels' oneDNN
products, then softmax and the value product. That scores about (1 + QUERY_BLOCK / T) times the causal
pairs, at the GEMM rate, and holds one block's scores at a time.

It is a custom op: opaque to torch.compile, so its loops run on concrete sizes and a new prompt length
compiles nothing new.
"""

from __future__ import annotations

import torch

from . import kernels

#: Query rows scored together: large enough for the GEMMs' rate, small enough that the masked half of the
#: diagonal block stays a small part of a long prefill (measured, one thread, 4k-8k tokens: 128-512 rows
#: within 5% of each other).
QUERY_BLOCK = 256
#: Multiply-adds per head from which a product runs on oneDNN, one call per head, rather than as one batched
#: MKL matmul (measured, one thread: at 1-2M the per-call cost of the loop is about what oneDNN's rate saves).
ONEDNN_FROM_MACS = 1 << 21
#: Scores held at once (float32: 4 MB): a long block's KV heads are taken a few at a time, so that each one's
#: scores are still in cache for the softmax and the value product (one thread, 4k tokens, 16 heads: all heads
#: at once ran 20% slower than one by one); a short call's heads go together, one product for all.
SCORE_ELEMENTS = 1 << 20


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`blocked_attention` serves these operands: CPU inference (the op has no gradient)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return query.device.type == "cpu" and not needs_grad


@torch.library.custom_op("gqla_compile::blocked_attention", mutates_args=())
def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, sink: torch.Tensor | None) -> torch.Tensor:
    """Attention of query [B, n_h, T, d] over key [B, h, S, d] and value [B, h, S, d_v], h dividing n_h (query
    head i reads KV head i // (n_h / h)). ``mask``: None (query i sees keys 0..i, sdpa's ``is_causal``), or a
    boolean (True: attend) or additive mask broadcastable to [B, n_h, T, S]. ``sink``: optional learned sinks
    [n_h], one more logit per head in the softmax's denominator. A query row that sees no key gets a finite
    output (uniform weights, or none under a sink), as a padded row must. Returns [B, n_h, T, d_v]."""
    batch, heads, t, _ = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if mask is not None:
        mask = mask[(None,) * (4 - mask.dim())]  # [B or 1, n_h or 1, T, S]
    sinks = None if sink is None else sink.float().view(kv_heads, group, 1, 1)
    out = query.new_empty(batch, heads, t, value.shape[-1])
    for b in range(batch):
        sequence_mask = None if mask is None else mask[b if mask.shape[0] > 1 else 0]
        for start in range(0, t, QUERY_BLOCK):
            stop = min(start + QUERY_BLOCK, t)
            first, end = _visible_columns(sequence_mask, start, stop)
            if end <= first:
                out[b, :, start:stop] = 0
                continue
            n, columns = stop - start, end - first
            step = max(1, SCORE_ELEMENTS // (group * n * columns))  # KV heads whose scores are held at once
            for h0 in range(0, kv_heads, step):
                h1 = min(h0 + step, kv_heads)
                heads_of = slice(h0 * group, h1 * group)
                # each KV head's query heads folded into rows: [h, group * n, d]
                rows = (query[b, heads_of, start:stop] * scale).view(h1 - h0, group * n, -1)
                scores = _product(rows, key[b, h0:h1, first:end].transpose(-1, -2)).view(h1 - h0, group, n, columns)
                if sequence_mask is None:
                    _mask_causal_diagonal(scores, start)
                else:
                    block_mask = sequence_mask[heads_of if sequence_mask.shape[0] > 1 else slice(0, 1),
                                               start:stop, first:end]
                    _apply_mask(scores, block_mask.view(h1 - h0, group, n, columns)
                                if block_mask.shape[0] > 1 else block_mask)
                probs = _softmax(scores, None if sinks is None else sinks[h0:h1]).to(value.dtype).flatten(1, 2)
                out[b, heads_of, start:stop] = _product(probs, value[b, h0:h1, first:end]).view(-1, n, value.shape[-1])
    return out


@blocked_attention.register_fake
def _(query, key, value, mask, scale, sink):
    return query.new_empty(query.shape[0], query.shape[1], query.shape[2], value.shape[-1])


def _visible_columns(mask: torch.Tensor | None, start: int, stop: int) -> tuple[int, int]:
    """[first, end): the key columns that some query row in [start, stop) may see (every head)."""
    if mask is None:
        return 0, stop
    columns = _allowed(mask[:, start:stop]).any(dim=0).any(dim=0).nonzero()
    if columns.numel() == 0:
        return 0, 0
    return int(columns[0]), int(columns[-1]) + 1


def _mask_causal_diagonal(scores: torch.Tensor, start: int) -> None:
    """Mask, in place, the keys after each query in the scores [.., n, start + n] of rows start.. under top-left
    causality (columns from key 0)."""
    n = scores.shape[-2]
    later = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu_(1)
    scores[..., start : start + n].masked_fill_(later, torch.finfo(scores.dtype).min)


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> None:
    """Apply, in place, a boolean (True: attend) or additive mask broadcastable to scores. Masked scores become
    the dtype's minimum, whatever they were (an additive -inf, or a padded key's non-finite value), so that a
    row that sees nothing stays finite and a masked key never reaches a row that sees others."""
    if mask.dtype != torch.bool:
        scores.add_(mask)
    scores.masked_fill_(~_allowed(mask), torch.finfo(scores.dtype).min)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where a boolean (True) or additive (above half the dtype's minimum) mask lets a query see a key."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _softmax(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim in float32; sinks (broadcast to the scores' rows) add exp(sink) to each row's
    denominator."""
    scores = scores.float()
    if sink is None:
        return torch.softmax(scores, dim=-1)
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    weights = (scores - top).exp_()
    return weights.div_(weights.sum(dim=-1, keepdim=True) + (sink - top).exp())


def _product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [h, M, K] @ y [h, K, P]: one batched torch.matmul where the products are small (a call's fixed cost
    is then what counts), else oneDNN per leading index (``kernels.onednn_matmul``, which reads each y[i] as it
    lies: dense rows, dense columns or a column slice of dense rows)."""
    if x[0].numel() * y.shape[-1] < ONEDNN_FROM_MACS or not kernels.AVAILABLE or x.dtype not in kernels.DTYPES:
        return torch.matmul(x, y)
    return kernels.onednn_matmul(x.contiguous(), y)
