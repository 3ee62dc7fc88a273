"""Every runtime cache layout (absorbed; grouped with the RoPE key copied or shared) against the unmodified model.

GQLA with n_g < n_h and DeepSeek-V3, float32, random biases and norm gains: logits of a prefill and 16 decode
steps within 1e-4, identical greedy tokens through ``generate`` with a DynamicCache, a StaticCache
(``cache_implementation="static"``: preallocated, written in place) and beam search (the cache reordered),
a cropped cache that decodes on, and each layer's cache of exactly the layout's shapes. The attention core
itself is checked against sdpa on the copied keys, with boolean and additive masks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import LAYOUTS, randomize_biases_and_norms, relative_error, teacher_forced_decode
from transformers import AutoModelForCausalLM, DynamicCache

import gqla_compile
from gqla_compile.paths import PATHS
from gqla_compile.runtime import attention_over_cache
from gqla_compile.tiny import tiny_deepseek_v3, tiny_gqla

MODELS = {
    "gqla": lambda: tiny_gqla(num_attention_heads=8, num_key_value_heads=2),  # n_g = 2 < n_h = 8
    "deepseek_v3": tiny_deepseek_v3,
}
PROMPT, STEPS, NEW_TOKENS = 6, 16, 10


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MODELS[request.param](), attn_implementation="sdpa").eval()
    return randomize_biases_and_norms(model)


@pytest.fixture(scope="module")
def eager_optimized(reference):
    """One eager rewrite per layout of the module's reference model, shared by the tests that only run it."""
    built = {}

    def get(path, rope_key):
        if (path, rope_key) not in built:
            built[path, rope_key] = _optimized(reference, path, rope_key, compile=False)
        return built[path, rope_key]

    return get


def _optimized(reference, path, rope_key, **kwargs):
    model = gqla_compile.optimize(copy.deepcopy(reference), path=path, rope_key=rope_key, target="h100", **kwargs)
    state = model.gqla_optimization
    assert state.path == path and state.plan.rope_key == rope_key
    assert all(type(m).__name__ == "LatentAttentionCore" for m in model.modules() if hasattr(m, "cache_views"))
    return model


def _check_layout(cache, model, batch: int, tokens: int) -> None:
    state = model.gqla_optimization
    n_g, d_n, d_R, d_v, d_c = (getattr(state.layers[0].dims, k) for k in ("n_g", "d_n", "d_R", "d_v", "d_c"))
    expected = {  # written out from DESIGN.md, not from paths.py
        ("absorbed", "copied"): ((batch, 1, tokens, d_c + d_R), (batch, 1, tokens, 0)),
        ("grouped", "copied"): ((batch, n_g, tokens, d_n + d_R), (batch, n_g, tokens, d_v)),
        ("grouped", "shared"): ((batch, 1, tokens, n_g * d_n + d_R), (batch, 1, tokens, n_g * d_v)),
    }[state.path, state.plan.rope_key]
    assert expected == PATHS[state.path].cache_shapes(state.layers[0].dims, batch, tokens, rope_key=state.plan.rope_key)
    for layer in cache.layers:
        assert (tuple(layer.keys.shape), tuple(layer.values.shape)) == expected


def _prompt(reference, batch=2):
    return torch.randint(0, reference.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(3))


def _greedy(model, prompt, **kwargs):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("path, rope_key", LAYOUTS)
def test_layout_matches_original(reference, eager_optimized, path, rope_key):
    optimized = eager_optimized(path, rope_key)
    tokens = torch.randint(0, reference.config.vocab_size, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = (teacher_forced_decode(m, tokens, PROMPT) for m in (reference, optimized))
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert relative_error(a, e) < 1e-4, f"step {step}: relative error {relative_error(a, e):.2e}"

    prompt = _prompt(reference)
    for kwargs in ({}, {"cache_implementation": "static"}, {"num_beams": 2}):
        want, got = _greedy(reference, prompt, **kwargs), _greedy(optimized, prompt, **kwargs)
        assert torch.equal(got.sequences, want.sequences), kwargs
        assert all(len(set(row[PROMPT:].tolist())) > 1 for row in want.sequences), "a prompt that says something"
        if "num_beams" not in kwargs:
            _check_layout(got.cache, optimized, batch=2, tokens=PROMPT + NEW_TOKENS - 1)


@pytest.mark.parametrize("path, rope_key", LAYOUTS)
def test_cropped_cache_decodes_on(reference, eager_optimized, path, rope_key):
    optimized = eager_optimized(path, rope_key)
    tokens = torch.randint(0, reference.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    logits = []
    with torch.no_grad():
        for model in (reference, optimized):
            cache = DynamicCache()
            model(tokens, cache=cache, use_cache=True)
            cache.crop(-4)  # back to 8 tokens
            logits.append(model(tokens[:, 8:10], cache=cache, use_cache=True).logits)
    assert relative_error(logits[1], logits[0]) < 1e-4


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_attention_over_cache_matches_sdpa_on_copied_keys(mask_kind):
    """Scores summed over the key parts (k_R kept once, values a strided view) equal sdpa on copied keys."""
    torch.manual_seed(0)
    batch, n_h, n_g, t, s, d_n, d_r, d_v = 2, 8, 2, 3, 11, 6, 4, 5
    query = torch.randn(batch, n_h, t, d_n + d_r)
    cached = torch.randn(batch, 1, s, n_g * d_n + d_r)
    nope = cached[:, 0, :, : n_g * d_n].unflatten(-1, (n_g, d_n)).transpose(1, 2)
    rope = cached[..., n_g * d_n :]
    values = torch.randn(batch, s, n_g * d_v).unflatten(-1, (n_g, d_v)).transpose(1, 2)  # a view
    mask = {"none": None, "bool": torch.rand(batch, 1, t, s) > 0.3, "additive": torch.randn(batch, 1, t, s)}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # every query sees one key
    got = attention_over_cache(query, [nope, rope], values, mask, 0.3)
    keys = torch.cat([nope, rope.expand(-1, n_g, -1, -1)], dim=-1)
    want = F.scaled_dot_product_attention(query, keys, values.contiguous(), attn_mask=mask, scale=0.3, enable_gqa=True)
    assert got.shape == (batch, n_h, t, d_v)
    assert relative_error(got, want) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("path, rope_key", [("absorbed", "copied"), ("grouped", "shared")])
def test_compiled_static_cache_matches_original(reference, path, rope_key):
    """Inductor with the preallocated StaticCache written in place: same greedy tokens, no graph break."""
    optimized = _optimized(reference, path, rope_key, compile=True)
    prompt = _prompt(reference)
    want = _greedy(reference, prompt, cache_implementation="static", output_logits=True)
    got = _greedy(optimized, prompt, cache_implementation="static", output_logits=True)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, e) in enumerate(zip(got.logits, want.logits)):
        assert relative_error(a, e) < 1e-4, f"step {step}: relative error {relative_error(a, e):.2e}"
    _check_layout(got.cache, optimized, batch=2, tokens=PROMPT + NEW_TOKENS - 1)
    assert optimized.gqla_optimization.compile.graph_breaks == 0
