"""The compute form per call (issue 24): over the absorbed path's latent cache, a call with many new tokens runs
the expanded form (the keys' latents expanded into per-group keys and values, GQA attention), one new token the
absorbed form; the grouped path has one form. Every family, both paths, against the unmodified model.

The family sweep runs eagerly on the families' tiny models (test_families' redrawn ones, cached per worker): a
left-padded batch of two prompts longer than 16 tokens and than the sliding window (shrunk to WINDOW where the
family's config has one), generated greedily, then a second ``generate`` turn on the same cache. The forms each
call took are recorded (``FormChoice.choose`` wrapped) as proof. One small compiled test runs several prompt
lengths and counts dynamo's frame compiles.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from _families import FAMILIES, TEXT_VOCAB, UNSUPPORTED
from _models import relative_error
from test_families import _model

import gqla_compile
from gqla_compile.compat import CACHE_FIELD
from gqla_compile.dims import LatentDims
from gqla_compile.paths import PATHS, FormChoice

PROMPT, WINDOW, PAD, NEW, SECOND, SECOND_NEW = 20, 6, 3, 3, 12, 3


def _params():
    return [pytest.param(name, path, marks=pytest.mark.xfail(strict=True, reason=UNSUPPORTED[name]))
            if name in UNSUPPORTED else (name, path) for name in FAMILIES for path in PATHS]


@functools.lru_cache(maxsize=None)
def _windowed(name: str):
    """The family's redrawn tiny model, its sliding window (where its config sets one) shrunk to WINDOW tokens so
    that it takes effect on the prompt."""
    model = copy.deepcopy(_model(name))
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if isinstance(getattr(config, "sliding_window", None), int):
            config.sliding_window = WINDOW
    for module in model.modules():
        if isinstance(getattr(module, "sliding_window", None), int):
            module.sliding_window = WINDOW
    return model


def _two_turns(model):
    """A left-padded batch of two prompts, NEW greedy tokens, then SECOND more prompt tokens on the same cache
    and SECOND_NEW greedy tokens: (tokens of both turns, logits of every step of both turns)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TEXT_VOCAB, (2, PROMPT), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    kwargs = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        first = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
        turn = torch.randint(0, TEXT_VOCAB, (2, SECOND), generator=generator)
        ids = torch.cat([first.sequences, turn], dim=1)
        mask = torch.cat([mask, torch.ones(2, NEW + SECOND, dtype=mask.dtype)], dim=1)
        second = model.generate(ids, attention_mask=mask, max_new_tokens=SECOND_NEW,
                                **{CACHE_FIELD: first.past_key_values}, **kwargs)
    return second.sequences, list(first.logits) + list(second.logits)


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    return _two_turns(_windowed(name))


@pytest.fixture
def recorded_forms(monkeypatch):
    """Every form choice the cores make, as (new tokens, keys, form name)."""
    calls = []
    choose = FormChoice.choose

    def recording(self, new, keys):
        form = choose(self, new, keys)
        calls.append((int(new), int(keys), form.name))
        return form

    monkeypatch.setattr(FormChoice, "choose", recording)
    return calls


@pytest.mark.parametrize("name, path", _params())
def test_prefill_expanded_decode_absorbed_and_a_second_turn_match_the_unmodified_model(name, path, recorded_forms):
    expected_tokens, expected_logits = _reference(name)
    assert len(set(expected_tokens[:, PROMPT:].flatten().tolist())) > 1  # not one repeated token
    model = gqla_compile.optimize(copy.deepcopy(_windowed(name)), path=path, target="h20", compile=False)
    recorded_forms.clear()  # optimize's verification ran both forms too; the generate calls follow
    tokens, logits = _two_turns(model)
    assert torch.equal(tokens, expected_tokens)
    for step, (got, want) in enumerate(zip(logits, expected_logits)):
        assert relative_error(got[0], want[0]) < 1e-4 and relative_error(got[1], want[1]) < 1e-4, (name, path, step)
    layers = len(model.gqla_optimization.layers)
    by_call = [recorded_forms[i: i + layers] for i in range(0, len(recorded_forms), layers)]
    assert len(by_call) == NEW + SECOND_NEW  # one call per generated token, each through every rewritten layer
    news = [new for new, _, _ in (call[0] for call in by_call)]
    assert news == [PROMPT] + [1] * (NEW - 1) + [1 + SECOND] + [1] * (SECOND_NEW - 1)
    forms = [{form for _, _, form in call} for call in by_call]
    if path == "grouped":
        assert all(f == {"grouped"} for f in forms)  # one form: the cache is already per group
    else:  # the prompt and the second turn expanded, every decode step absorbed
        expected = [{"expanded"}] + [{"absorbed"}] * (NEW - 1) + [{"expanded"}] + [{"absorbed"}] * (SECOND_NEW - 1)
        assert forms == expected, (name, forms)


CHUNKS = (20, 12, 3, 9)


@pytest.mark.parametrize("path", PATHS)
def test_chunked_prefill_takes_the_cheaper_form_per_chunk(path, recorded_forms):
    """A prompt fed in chunks of 20, 12, 3 and 9 tokens on one cache (a chunked prefill): every chunk's logits
    within 1e-4 of the unmodified model's on the whole prompt, and each chunk in the form the rule picks for its
    length after its prefix (absorbed path: 20 and 12 expanded, 3 absorbed, 9 after 35 absorbed)."""
    from transformers import DynamicCache

    reference = _windowed("deepseek_v3")
    ids = torch.randint(0, TEXT_VOCAB, (1, sum(CHUNKS)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    model = gqla_compile.optimize(copy.deepcopy(reference), path=path, target="h20", compile=False)
    recorded_forms.clear()
    cache, start, got = DynamicCache(config=model.config), 0, []
    with torch.no_grad():
        for size in CHUNKS:
            got.append(model(input_ids=ids[:, start: start + size], use_cache=True, **{CACHE_FIELD: cache}).logits)
            start += size
    assert relative_error(torch.cat(got, dim=1), expected) < 1e-4
    choice = next(m.gqla_runtime.core.forms for m in model.modules() if hasattr(m, "gqla_runtime"))
    layers = len(model.gqla_optimization.layers)
    forms = [recorded_forms[i * layers][2] for i in range(len(CHUNKS))]
    prefixes = [sum(CHUNKS[:i]) for i in range(len(CHUNKS))]
    assert forms == [choice.choose(n, p + n).name for n, p in zip(CHUNKS, prefixes)]
    if path == "absorbed":
        assert forms == ["expanded", "expanded", "absorbed", "absorbed"]


def test_the_tiny_families_cross_over_where_the_sweep_needs_them():
    """The sweep's calls fall on the sides of the crossover it asserts: a fresh prompt and a 13-token turn after a
    prefix of 22 expand; one token after any prefix, or 3 after 22, stays absorbed (tiny families' dims)."""
    dims = LatentDims(n_h=4, n_g=4, d_c=16, d_R=4, d_n=8, d_v=6, hidden_size=64, q_lora_rank=24)
    choice = PATHS["absorbed"].compute_forms(dims)
    prefix = PROMPT + NEW - 1
    assert choice.choose(PROMPT, PROMPT).name == "expanded"
    assert choice.choose(1 + SECOND, prefix + 1 + SECOND).name == "expanded"
    assert choice.choose(1, prefix + 1).name == choice.choose(3, prefix + 3).name == "absorbed"
    assert 3 < choice.crossover(prefix) <= 1 + SECOND


def test_deepseek_v3_crossover_follows_the_flop_terms():
    """DeepSeek-V3 dims, 16 heads: the absorbed form's pairs cost (d_c + d_R) + d_c = 1088 dims per head, the
    expanded form's (d_n + d_R) + d_v = 320, plus the expansion per key; the crossover T(P) is the smallest T with
    T (P + T) 2 n_h (1088 - 320) > 2 n_g (d_n + d_v) d_c P (the W_UK / W_UV per new token equals the expansion per
    key here, n_g = n_h): about 171 tokens for a long prefix, 1 for a fresh prompt."""
    dims = LatentDims(n_h=16, n_g=16, d_c=512, d_R=64, d_n=128, d_v=128, hidden_size=2048, q_lora_rank=None)
    choice = PATHS["absorbed"].compute_forms(dims)
    absorbed, expanded = choice.forms
    assert absorbed.per_pair == 2 * 16 * 1088 and expanded.per_pair == 2 * 16 * 320
    for prefix in (0, 1, 256, 4096, 100_000):
        threshold = next(t for t in range(1, 200) if t * (prefix + t) * 2 * 16 * 768 > 2 * 16 * 256 * 512 * prefix)
        assert choice.crossover(prefix) == threshold, prefix
    assert choice.crossover(100_000) <= 171 and PATHS["grouped"].compute_forms(dims).crossover(0) is None
    plan = gqla_compile.plan(gqla_compile.GqlaConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
                                                     kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                                     v_head_dim=128, q_lora_rank=None, num_hidden_layers=2),
                             "h100", path="absorbed", context_len=4096)
    text = plan.explain()
    assert f"P=4096: {choice.crossover(4096)}" in text and "decode step (1 new after 4096): absorbed" in text
    assert "prefill (4096 new after 0): expanded" in text


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_compiled_prefills_of_several_lengths_do_not_recompile_at_each(cache):
    """torch.compile over four prompt lengths, each prefilled in the expanded form and decoded in the absorbed
    form: the frames dynamo compiles stop growing with the length (a static first graph, then dynamic ones), no
    graph break, no eager fallback, and the tokens are the unmodified model's. With a StaticCache the prefill's
    shortcut over the written rows is a ``torch.cond`` in the same graphs."""
    from torch._dynamo.utils import counters

    reference = _windowed("deepseek_v3")
    model = gqla_compile.optimize(copy.deepcopy(reference), path="absorbed", target="h20")
    generator = torch.Generator().manual_seed(1)
    compiles = []
    for length in (17, 23, 31, 40):
        ids = torch.randint(0, TEXT_VOCAB, (1, length), generator=generator)
        # the mask always passed: generate makes one only where the prompt holds the pad id, and a call with one
        # more argument is another graph whatever the attention does
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                      cache_implementation=cache)
        with torch.no_grad():
            expected = reference.generate(ids, **kwargs)
            before = counters["stats"]["unique_graphs"]
            got = model.generate(ids, **kwargs)
        compiles.append(counters["stats"]["unique_graphs"] - before)
        assert torch.equal(got, expected), length
    stats = model.gqla_optimization.compile
    assert stats.graph_breaks == 0 and not stats.fell_back_to_eager
    assert sum(compiles[2:]) == 0, compiles  # lengths 31 and 40 reuse the graphs of 17 and 23


def test_verification_checks_each_compute_form(monkeypatch):
    """optimize checks each form of the core, forced for every call: an expanded form that computed wrong values
    is refused (and the model left as it was) however the rule would pick forms for the recorded call."""
    from gqla_compile.runtime import ExpandedForm

    expand = ExpandedForm.forward
    monkeypatch.setattr(ExpandedForm, "forward", lambda self, key: tuple(1.1 * t for t in expand(self, key)))
    model = copy.deepcopy(_windowed("deepseek_v3"))
    forward = model.model.layers[0].self_attn.forward
    with pytest.raises(gqla_compile.VerificationError, match="in the expanded compute form"):
        gqla_compile.optimize(model, path="absorbed", target="h20", compile=False)
    assert model.model.layers[0].self_attn.forward == forward and getattr(model, "gqla_optimization", None) is None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_a_prefill_into_an_empty_static_cache_reads_only_the_written_rows(path, padded, recorded_forms):
    """generate with a StaticCache (its unwritten rows masked): an unpadded prompt's mask is plain causal over its
    own rows, so the core attends over those PROMPT rows only (the form rule sees PROMPT keys, not the cache's
    length); a left-padded batch's mask is not, so the call reads every row under the mask. Both give the
    unmodified model's tokens and logits (1e-4)."""
    reference = _windowed("deepseek_v3")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, TEXT_VOCAB, (2, PROMPT), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :PAD], mask[1, :PAD] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True, cache_implementation="static")
    with torch.no_grad():
        expected = reference.generate(ids, **kwargs)
        model = gqla_compile.optimize(copy.deepcopy(reference), path=path, target="h20", compile=False)
        recorded_forms.clear()
        got = model.generate(ids, **kwargs)
    assert len(set(expected.sequences[:, PROMPT:].flatten().tolist())) > 1
    assert torch.equal(got.sequences, expected.sequences)
    for got_logits, want in zip(got.logits, expected.logits):
        assert relative_error(got_logits, want) < 1e-4
    new, keys, form = recorded_forms[0]
    cache_length = recorded_forms[-1][1]  # a decode step reads the whole static cache under its mask
    assert new == PROMPT and cache_length > PROMPT
    assert keys == (cache_length if padded else PROMPT)
    assert form == ("grouped" if path == "grouped" else "expanded")


@pytest.mark.slow
def test_compiled_static_prefill_with_every_scalar_dynamic_from_the_first_call():
    """Dynamo's automatic dynamic keeps what it saw per code object: after other compiled models (other scales)
    in the same process, the core's first compile is dynamic, scalars included. The prefill's torch.cond must
    still trace (it failed so: the two branches shared one SymFloat scale), and give the unmodified tokens."""
    reference = _windowed("deepseek_v3")
    model = gqla_compile.optimize(copy.deepcopy(reference), path="absorbed", target="h20")
    ids = torch.randint(0, TEXT_VOCAB, (1, 17), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with torch._dynamo.config.patch(assume_static_by_default=False), torch.no_grad():
        got = model.generate(ids, **kwargs)
        expected = reference.generate(ids, **kwargs)
    assert torch.equal(got, expected)
    assert model.gqla_optimization.compile.graph_breaks == 0
