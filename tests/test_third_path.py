"""One ``DecodePath`` subclass, written here and registered the way a user would, is all a new path takes: it is
planned (cost model), built, verified, installed, reported and decodes exactly what the unmodified model does,
with no other change to the package.

The path is the grouped path under another name whose cache always keeps the RoPE key once beside the groups: a
layout of its own (not the plan's ``rope_key`` choice, which it ignores), so that its cache, its cost and its
installed runtime all differ visibly from both built-in paths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import assert_rewritten_for_real, randomize_biases_and_norms, relative_error, teacher_forced_decode
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.paths import PATHS, GroupedPath
from gqla_compile.tiny import tiny_gqla

NAME = "grouped_key_once"
PROMPT, STEPS, NEW_TOKENS = 6, 12, 10


class KeyOnceGroupedPath(GroupedPath):
    """Grouped GQA whose cache holds k_R once per token, whatever the plan's RoPE-key choice."""

    name = NAME
    cache_layout = "key [B, 1, T, n_g d_n + d_R] (k_R once, after the groups' no-RoPE keys), value [B, 1, T, n_g d_v]"
    rope_keys = ()  # one layout only: the plan's rope_key does not apply

    def cache_elements(self, dims, *, rope_key="copied"):
        return super().cache_elements(dims, rope_key="shared")

    def cache_shapes(self, dims, batch, tokens, *, rope_key="copied"):
        return super().cache_shapes(dims, batch, tokens, rope_key="shared")

    def cache_views(self, dims, key, value, *, rope_key="copied"):
        return super().cache_views(dims, key, value, rope_key="shared")

    def build(self, *args, rope_key="copied", **kwargs):
        return super().build(*args, rope_key="shared", **kwargs)


@pytest.fixture
def registered():
    path = gqla_compile.register_path(KeyOnceGroupedPath())
    try:
        yield path
    finally:
        gqla_compile.unregister_path(NAME)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    config = tiny_gqla(num_attention_heads=8, num_key_value_heads=2)  # n_g = 2 < n_h = 8
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return randomize_biases_and_norms(model)


def test_a_registered_path_is_planned_built_verified_installed_and_reported(registered, reference):
    dims = gqla_compile.LatentDims.from_config(reference.config)
    key_once = dims.n_g * (dims.d_n + dims.d_v) + dims.d_R  # written out from DESIGN.md's table

    # planned: costed beside the built-in paths, at its own cache size, and taken when forced
    plan = gqla_compile.plan(reference, "h100", rope_key="copied", path=NAME)
    assert plan.path == NAME and list(plan.costs) == ["absorbed", "grouped", NAME]
    assert plan.costs[NAME].cache_bytes_per_token == key_once * 4  # float32, not the copied layout's
    assert plan.costs["grouped"].cache_bytes_per_token == dims.n_g * (dims.d_n + dims.d_R + dims.d_v) * 4
    assert plan.costs[NAME].part("attention_core").bytes < plan.costs["grouped"].part("attention_core").bytes
    assert f"path forced to {NAME}" in plan.reason and NAME in plan.explain()

    # built, verified and installed
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path=NAME, rope_key="copied", target="h100",
                                      compile=False)
    state = optimized.gqla_optimization
    assert state.path == NAME and state.plan.rope_key == "copied"
    assert_rewritten_for_real(optimized, NAME)
    assert all(layer.cache_elements_after == key_once and layer.verification_error < 1e-4 for layer in state.layers)
    assert [r.pass_name for r in state.layers[0].records] == ["detect", "split", "expand"]

    # decodes exactly what the unmodified model does, from its own cache layout
    tokens = torch.randint(0, reference.config.vocab_size, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = (teacher_forced_decode(m, tokens, PROMPT) for m in (reference, optimized))
    errors = [relative_error(a, e) for a, e in zip(actual, expected)]
    assert max(errors) < 1e-4, errors
    prompt = tokens[:, :PROMPT]
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    want, got = reference.generate(prompt, **kwargs), optimized.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert all(len(set(row[PROMPT:].tolist())) > 1 for row in want.sequences), "a prompt that says something"
    cached = PROMPT + NEW_TOKENS - 1
    for layer in got.cache.layers:
        assert tuple(layer.keys.shape) == (2, 1, cached, dims.n_g * dims.d_n + dims.d_R)
        assert tuple(layer.values.shape) == (2, 1, cached, dims.n_g * dims.d_v)

    # reported: the report names the path and describes its layout
    report = gqla_compile.report(optimized)
    text = report.to_text()
    assert NAME in text and registered.cache_layout in text
    assert report.to_json() and NAME in report.to_markdown()


def test_registration_is_checked_and_undone(registered):
    assert PATHS[NAME] is registered
    with pytest.raises(ValueError, match="a name of its own"):
        gqla_compile.register_path(KeyOnceGroupedPath())
    with pytest.raises(ValueError, match="built-in"):
        gqla_compile.unregister_path("grouped")
    with pytest.raises(TypeError, match="DecodePath"):
        gqla_compile.register_path("grouped")
    assert gqla_compile.unregister_path(NAME) is registered and NAME not in PATHS
    with pytest.raises(ValueError, match=f"path must be 'auto', .*got '{NAME}'"):
        gqla_compile.plan(tiny_gqla(), "h100", path=NAME)
    gqla_compile.register_path(registered)  # the fixture removes it again
