"""The process's trace cache (trace_cache.py): a block traced before is not exported again, and a block that
differs in anything its trace depends on is traced afresh; either way the optimized model is exact against its
own unmodified original."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import randomize_biases_and_norms, relative_error, teacher_forced_decode
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.capture import find_candidates, record_calls
from gqla_compile.trace_cache import TRACES, TraceCache, trace_key
from gqla_compile.tiny import tiny_deepseek_v3

PROMPT, STEPS = 6, 6


def _model(seed: int, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_deepseek_v3(**overrides), attn_implementation="sdpa").eval()
    with torch.no_grad():  # weights large enough that attention matters
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.5)
    return randomize_biases_and_norms(model, seed)


def _assert_exact(original, path: str):
    optimized = gqla_compile.optimize(copy.deepcopy(original), path=path, target="h100", compile=False)
    tokens = torch.randint(0, original.config.vocab_size, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = teacher_forced_decode(original, tokens, PROMPT)
        actual = teacher_forced_decode(optimized, tokens, PROMPT)
    errors = [relative_error(a, e) for a, e in zip(actual, expected)]
    assert max(errors) < 1e-4, errors
    return optimized


def _first_block(model):
    candidates = find_candidates(model)
    records = record_calls(model, candidates)
    path = next(p for p in candidates if p in records)
    return candidates[path], records[path].arguments


def test_a_second_model_of_the_same_architecture_reuses_the_trace_on_both_paths():
    TRACES.clear()
    _assert_exact(_model(0), "grouped")
    assert (TRACES.hits, TRACES.misses) == (0, 1)  # one export for both layers of the first model
    _assert_exact(_model(1), "absorbed")  # other weights, the other path: the same graph
    assert (TRACES.hits, TRACES.misses) == (1, 1)


def test_a_block_that_scales_its_scores_otherwise_is_traced_afresh():
    """The softmax scale is a Python float on the block, baked into its graph as a constant: a stale graph
    would score with the first model's scale, so a changed scale must miss the cache."""
    TRACES.clear()
    _assert_exact(_model(0), "absorbed")
    rescaled = _model(0)
    for module in rescaled.modules():
        if hasattr(module, "scaling"):
            module.scaling *= 1.7
    _assert_exact(rescaled, "absorbed")
    assert (TRACES.hits, TRACES.misses) == (0, 2)


def test_a_changed_config_argument_shape_or_class_changes_the_key():
    block, arguments = _first_block(_model(0))
    key = trace_key(block, arguments)
    assert key is not None and key == trace_key(copy.deepcopy(block), arguments)
    other = copy.deepcopy(block)
    other.config.rope_theta = 1234.0
    assert trace_key(other, arguments) != key
    longer = {**arguments, "hidden_states": torch.cat([arguments["hidden_states"]] * 2, dim=1)}
    assert trace_key(block, longer) != key
    assert trace_key(block, arguments, context=("opaque child",)) != key
    redefined = copy.deepcopy(block)
    redefined.__class__ = type(type(block).__name__, (type(block),), {})  # the same name, another class
    assert trace_key(redefined, arguments) != key


@pytest.mark.parametrize("change", ["closure forward", "large tensor attribute", "unknown object"])
def test_a_block_holding_what_cannot_be_written_down_is_never_cached(change):
    block, arguments = _first_block(_model(0))
    block = copy.deepcopy(block)
    if change == "closure forward":
        original = block.forward
        block.forward = lambda *args, **kwargs: original(*args, **kwargs)
    elif change == "large tensor attribute":
        block.table = torch.zeros(8192)
    else:
        block.helper = object()
    assert trace_key(block, arguments) is None
    cache, calls = TraceCache(), []
    for _ in range(2):
        cache.get_or_trace(None, lambda: calls.append(1))
    assert len(calls) == 2 and len(cache) == 0


def test_the_cache_keeps_the_most_recent_traces():
    cache = TraceCache(max_size=2)
    for key in ("a", "b", "a", "c"):
        cache.get_or_trace((key,), lambda key=key: key.upper())
    assert len(cache) == 2 and (cache.hits, cache.misses) == (1, 3)
    assert cache.get_or_trace(("a",), lambda: "new") == ("A", True)  # "b" was the least recently used
    assert cache.get_or_trace(("b",), lambda: "B2") == ("B2", False)
