"""Sparse latent attention (DSA): the cost model prices a step by the index top-k, not the context.

The families' decode equivalence with the selection, and the report's sparse column, are in test_families.py.
"""

from __future__ import annotations

import pytest

from gqla_compile import plan
from gqla_compile.dims import LatentDims

DIMS = LatentDims(n_h=128, n_g=128, d_c=512, d_R=64, d_n=128, d_v=128, hidden_size=7168)  # DeepSeek-V3.2


@pytest.mark.parametrize("path", ["absorbed", "grouped"])
def test_a_sparse_step_costs_k_tokens_of_attention_whatever_the_context(path):
    config = DIMS.as_config(2)
    sparse = plan(config, "h100", path=path, context_len=8192, top_k=512)
    dense_at_k = plan(config, "h100", path=path, context_len=512)
    dense = plan(config, "h100", path=path, context_len=8192)
    core = {name: p.costs[path].part("attention_core") for name, p in
            (("sparse", sparse), ("dense_at_k", dense_at_k), ("dense", dense))}
    assert core["sparse"].bytes == core["dense_at_k"].bytes and core["sparse"].flops == core["dense_at_k"].flops
    assert core["dense"].bytes == 16 * core["sparse"].bytes
    assert sparse.top_k == 512 and "top-512" in sparse.explain() and sparse.to_dict()["inputs"]["top_k"] == 512
    # a k past the context reads the context
    assert plan(config, "h100", path=path, context_len=256, top_k=512).costs[path].bytes == \
        plan(config, "h100", path=path, context_len=256).costs[path].bytes


def test_the_config_index_top_k_is_the_default():
    config = DIMS.as_config(2)
    config.index_topk = 2048
    assert plan(config, "h100", context_len=8192).top_k == 2048
    assert plan(DIMS.as_config(2), "h100").top_k is None


# --- Inductor on the sparse families (slow): one compiled model per family, shared ---------------------------------

COMPILED = [("deepseek_v32", "absorbed"), ("glm_moe_dsa", "grouped")]  # GLM-5 is glm_moe_dsa


@pytest.fixture(scope="session", params=COMPILED, ids=lambda fp: "-".join(fp))
def compiled_sparse_model(request):
    import copy

    import gqla_compile
    from test_families import _model

    name, path = request.param
    return name, gqla_compile.optimize(copy.deepcopy(_model(name)), path=path, target="h20", compile=True)


@pytest.mark.slow
def test_compiled_sparse_models_decode_like_the_unmodified_model_with_no_graph_break(compiled_sparse_model):
    from _models import relative_error
    from test_families import _greedy, _reference

    name, model = compiled_sparse_model
    prompt, expected_tokens, expected_steps = _reference(name)
    tokens, steps, _ = _greedy(model, prompt)
    assert tokens == expected_tokens
    assert all(relative_error(got, want) < 1e-4 for got, want in zip(steps, expected_steps))
    stats = model.gqla_optimization.compile
    assert stats.graphs >= 1 and stats.graph_breaks == 0 and not stats.fell_back_to_eager


@pytest.mark.parametrize("queries", [3, 20])  # decode-sized steps gather the rows; longer ones mask the cache
@pytest.mark.parametrize("with_sink", [False, True])  # learned sinks (hy_v4): one more logit per head, no value
def test_selected_attention_equals_dense_attention_masked_to_the_selection(queries, with_sink):
    import torch

    from gqla_compile.runtime import attention_over_cache, causal_attention, selected_attention

    generator = torch.Generator().manual_seed(0)
    context, heads, top_k = 30, 4, 5
    query = torch.randn(2, heads, queries, 8, generator=generator)
    key = torch.randn(2, 1, context, 8, generator=generator)  # absorbed-like: one head, values a view of the key
    value = key[..., :6]
    sink = torch.randn(heads, generator=generator) if with_sink else None
    positions = torch.arange(context - queries, context)
    causal = torch.arange(context)[None, :] <= positions[:, None]  # [T, S]
    mask = torch.zeros(2, 1, queries, context).masked_fill(~causal, torch.finfo(torch.float32).min)
    index_scores = torch.randn(2, queries, context, generator=generator).masked_fill(~causal, float("-inf"))
    indices = index_scores.topk(top_k, dim=-1).indices
    selected = torch.zeros(2, 1, queries, context, dtype=torch.bool).scatter(-1, indices.unsqueeze(1), True)
    scale = 0.3
    scores = (query @ key.transpose(-1, -2)) * scale + mask.masked_fill(~selected, -1e30)
    if with_sink:  # the families' own form: a sink column joined to the scores, dropped after the softmax
        scores = torch.cat([scores, sink.view(1, heads, 1, 1).expand(2, heads, queries, 1)], dim=-1)
    expected = torch.softmax(scores, -1)[..., :context] @ value
    got = selected_attention(query, key, value, mask, indices,
                             lambda q, k, v, m: attention_over_cache(q, [k], v[..., :6], m, scale, sink),
                             lambda m: causal_attention(query, [key], value, m, scale, sink))
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("queries", [3, 20])
def test_indices_outside_the_cache_select_nothing_and_a_repeated_one_counts_once(queries):
    """A selection with transformers' -1 for "no token" (and any index past the cache) and, from an indexer
    that is not a top-k, a position listed twice (``without_repeats``, which TokenSelection applies to such a
    selection): the same as the family's scatter into its mask."""
    import torch

    from gqla_compile.attention import attention_over_cache, causal_attention, selected_attention, without_repeats

    generator = torch.Generator().manual_seed(1)
    context, heads = 30, 4
    query = torch.randn(2, heads, queries, 8, generator=generator)
    key = torch.randn(2, 1, context, 8, generator=generator)
    value = key[..., :6]
    indices = torch.randint(0, context, (2, queries, 6), generator=generator)
    indices[..., 1] = indices[..., 0]  # repeated
    indices[..., 2] = -1
    indices[..., 3] = context + 4  # past the cache
    selected = torch.zeros(2, queries, context, dtype=torch.int32).scatter_add(
        -1, indices.clamp(0, context - 1), ((indices >= 0) & (indices < context)).int()) > 0
    every_key = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    scale = 0.3
    scores = (query @ key.transpose(-1, -2)) * scale
    expected = torch.softmax(scores.masked_fill(~selected.unsqueeze(1), float("-inf")), -1) @ value
    got = selected_attention(query, key, value, every_key, without_repeats(indices),
                             lambda q, k, v, m: attention_over_cache(q, [k], v[..., :6], m, scale),
                             lambda m: causal_attention(query, [key], value, m, scale))
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_indexer_is_priced_on_both_paths_and_grows_with_the_context():
    """DeepSeek-V3.2's indexer (64 heads x 128 dims) scores every cached index key: the same part on both
    paths, linear in the context, while the attention core stays at k tokens."""
    config = DIMS.as_config(2)
    config.index_topk, config.index_n_heads, config.index_head_dim = 2048, 64, 128
    short, long = (plan(config, "h100", context_len=c) for c in (8192, 65536))
    assert short.index_dims == (64, 128) and short.to_dict()["inputs"]["index_dims"] == [64, 128]
    assert "indexer: 64 heads x 128" in short.explain()
    for path in ("absorbed", "grouped"):
        a, b = short.costs[path].part("indexer"), long.costs[path].part("indexer")
        assert a.bytes == 8192 * 128 * 2 and a.flops == 2 * 64 * 128 * 8192  # bfloat16 index keys, one token
        assert b.bytes == 8 * a.bytes and b.flops == 8 * a.flops
        assert short.costs[path].part("attention_core").bytes == long.costs[path].part("attention_core").bytes
    assert short.costs["absorbed"].part("indexer") == short.costs["grouped"].part("indexer")
    assert all(p.name != "indexer" for p in plan(DIMS.as_config(2), "h100").costs["absorbed"].parts)
