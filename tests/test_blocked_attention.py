"""The CPU prefill op (gqla_compile::blocked_attention) against attention written out in full: causal without a
mask, boolean and additive masks with left padding, a prefix and a sliding window, learned sinks, grouped
query heads, several query blocks with a partial last one; its torch.library registration (opcheck); and a
compiled caller over several lengths that compiles no new graph."""

import pytest
import torch

from gqla_compile import blocked_attention as blocked
from gqla_compile.blocked_attention import blocked_attention

SCALE = 0.3
MIN = torch.finfo(torch.float32).min


def full_attention(query, key, value, allowed, sink=None):
    """Every score materialised: [B, n_h, T, S] with the KV heads repeated, masked, softmax (a sink as one more
    column), times the values."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query @ key.transpose(-1, -2) * SCALE).masked_fill(~allowed, MIN)
    if sink is not None:
        column = sink.view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        return (torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]) @ value
    return torch.softmax(scores, -1) @ value


def operands(batch, heads, kv_heads, t, s, dims=24, value_dims=16):
    generator = torch.Generator().manual_seed(t * 31 + s)
    return (torch.randn(batch, heads, t, dims, generator=generator),
            torch.randn(batch, kv_heads, s, dims, generator=generator),
            torch.randn(batch, kv_heads, s, value_dims, generator=generator),
            torch.randn(heads, generator=generator))


def padded_window_mask(batch, t, s, window, padding):
    """[B, 1, T, S]: query i (at position s - t + i) sees keys up to its own, the last ``window`` only, and
    none of sequence 0's first ``padding`` keys (left padding)."""
    keys, queries = torch.arange(s), torch.arange(s - t, s)
    allowed = (keys[None] <= queries[:, None]) & (keys[None] > queries[:, None] - window)
    pad = torch.zeros(batch, s, dtype=torch.bool)
    pad[0, :padding] = True
    return (allowed[None] & ~pad[:, None])[:, None]


@pytest.mark.parametrize("block", [7, blocked.QUERY_BLOCK])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("kind", ["causal", "boolean", "additive"])
def test_matches_attention_written_out_in_full(monkeypatch, block, sinks, kind):
    monkeypatch.setattr(blocked, "QUERY_BLOCK", block)
    t = 2 * block + 5  # two whole blocks and a partial one
    s = t if kind == "causal" else t + 9  # a prefix of 9 cached tokens under a mask
    query, key, value, sink = operands(2, 6, 2, t, s)
    allowed = padded_window_mask(2, t, s, window=block + 3, padding=block + 2)
    if kind == "causal":
        mask, allowed = None, torch.ones(t, s, dtype=torch.bool).tril()
    elif kind == "boolean":
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, MIN)
    got = blocked_attention(query, key, value, mask, SCALE, sink if sinks else None)
    want = full_attention(query, key, value, allowed.expand(2, 6, t, s), sink if sinks else None)
    real = allowed.expand(2, 1, t, s).any(-1).unsqueeze(-1)  # rows that see a key (not padding)
    assert torch.isfinite(got).all()
    assert ((got - want).abs() * real).max() < 1e-5


def test_a_block_of_padding_rows_only_is_finite_and_the_rest_exact(monkeypatch):
    monkeypatch.setattr(blocked, "QUERY_BLOCK", 4)
    query, key, value, _ = operands(1, 2, 1, 13, 13)
    allowed = padded_window_mask(1, 13, 13, window=13, padding=6)  # rows 0..5 of sequence 0 see nothing
    got = blocked_attention(query, key, value, allowed, SCALE, None)
    want = full_attention(query, key, value, allowed.expand(1, 2, 13, 13))
    assert torch.isfinite(got).all()
    assert (got[..., 6:, :] - want[..., 6:, :]).abs().max() < 1e-5


def test_op_registration():
    query, key, value, sink = operands(1, 4, 2, 19, 23)
    mask = padded_window_mask(1, 19, 23, window=8, padding=2)
    torch.library.opcheck(blocked_attention, (query, key, value, mask, SCALE, sink))
    torch.library.opcheck(blocked_attention, (query[..., :19, :], key[..., :19, :], value[..., :19, :], None,
                                              SCALE, None))


def test_gradients_and_other_devices_are_left_to_sdpa():
    query, key, value, _ = operands(1, 2, 1, 20, 20)
    assert blocked.supports(query, key, value)
    with torch.enable_grad():
        assert not blocked.supports(query.requires_grad_(), key, value)
    assert not blocked.supports(query.detach().to("meta"), key.to("meta"), value.to("meta"))


def test_compiled_caller_compiles_no_new_graph_per_length():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(backend=counter, dynamic=None)
    def attend(query, key, value):
        return blocked_attention(query * 1.0, key, value, None, SCALE, None)

    for length in (17, 29, 41, 300):
        query, key, value, _ = operands(1, 4, 1, length, length)
        want = full_attention(query, key, value, torch.ones(length, length, dtype=torch.bool).tril())
        assert (attend(query, key, value) - want).abs().max() < 1e-5
    assert counter.frame_count == 2  # the first length static, then one dynamic graph for the rest


def test_masked_keys_never_reach_a_row_even_when_not_finite():
    """An additive -inf mask, and keys and values of padded positions that are not finite (what a padded row
    can carry into the next layer): the rows that see real keys match, every row stays finite."""
    query, key, value, _ = operands(1, 2, 1, 20, 20)
    allowed = padded_window_mask(1, 20, 20, window=20, padding=5)
    want = full_attention(query, key, value, allowed.expand(1, 2, 20, 20))
    key[..., :5, :], value[..., :5, :] = float("nan"), float("inf")
    for mask in (allowed, torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))):
        got = blocked_attention(query, key, value, mask, SCALE, None)
        assert torch.isfinite(got[..., 5:, :]).all()
        assert (got[..., 5:, :] - want[..., 5:, :]).abs().max() < 1e-5
