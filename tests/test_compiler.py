"""The compiler end to end: detect, rewrite to each path, install, run under generate (eager and Inductor).

Every check is against the unmodified eager model in float32 with random non-zero biases and norm gains:
logits of the prefill and of 32 decode steps within 1e-4 relative error, identical greedy tokens, every
attention block's forward replaced by the installed runtime, and caches of exactly the rewritten layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import (
    LAYOUTS,
    HandWrittenLatentLM,
    assert_cache_layout,
    assert_rewritten_for_real,
    cache_elements,
    expected_cache_elements,
    randomize_biases_and_norms,
    relative_error,
    teacher_forced_decode,
)
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

import gqla_compile
from gqla_compile.errors import NoLatentAttentionError
from gqla_compile.tiny import tiny_deepseek_v2, tiny_deepseek_v3, tiny_gqla, tiny_llama

PATHS = gqla_compile.paths.PATH_NAMES
DECODE_STEPS = 32


def _hf_model(factory, attn_implementation="sdpa", **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(factory(**overrides), attn_implementation=attn_implementation).eval()
    return randomize_biases_and_norms(model)


MODELS = {
    "deepseek_v2": lambda: _hf_model(tiny_deepseek_v2),
    "deepseek_v2_eager": lambda: _hf_model(tiny_deepseek_v2, "eager"),
    "deepseek_v3": lambda: _hf_model(tiny_deepseek_v3),
    "deepseek_v3_q_lora": lambda: _hf_model(tiny_deepseek_v3, q_lora_rank=24, attention_bias=True),
    "deepseek_v3_eager": lambda: _hf_model(tiny_deepseek_v3, "eager"),
    "gqla": lambda: _hf_model(tiny_gqla),
    "gqla_q_lora_eager": lambda: _hf_model(tiny_gqla, "eager", q_lora_rank=24),
    "gqla_converted_style": lambda: _hf_model(tiny_gqla, kv_a_layernorm=False, attention_bias=True, attention_output_bias=True),
    "hand_written_gqla": lambda: randomize_biases_and_norms(HandWrittenLatentLM().eval()),
}


def _check_equivalent(reference, optimized, vocab: int) -> None:
    tokens = torch.randint(0, vocab, (2, 6 + DECODE_STEPS))
    with torch.no_grad():
        expected = teacher_forced_decode(reference, tokens, prompt_len=6)
        actual = teacher_forced_decode(optimized, tokens, prompt_len=6)
    assert len(actual) == DECODE_STEPS + 1
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert relative_error(a, e) < 1e-4, f"step {step}: relative error {relative_error(a, e):.2e}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(MODELS))
def test_eager_rewrite_matches_original(name, path):
    reference = MODELS[name]()
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path=path, target="h100", compile=False)
    state = optimized.gqla_optimization
    assert state.path == path and len(state.layers) == 2
    assert_rewritten_for_real(optimized, path)
    vocab = getattr(getattr(reference, "config", None), "vocab_size", None) or reference.vocab
    _check_equivalent(reference, optimized, vocab)
    prompt = torch.randint(0, vocab, (2, 5))
    if hasattr(optimized, "generate"):
        cache = optimized.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                   return_dict_in_generate=True).cache
        assert_cache_layout(cache, optimized, batch=2, tokens=5 + 4 - 1)
    else:
        cache = DynamicCache()
        with torch.no_grad():
            optimized(prompt, cache=cache, use_cache=True)
        assert_cache_layout(cache, optimized, batch=2, tokens=5)


def test_gqla_groups_are_found_by_probing():
    model = gqla_compile.optimize(MODELS["gqla"](), path="absorbed", target="h100", compile=False)
    assert model.gqla_optimization.layers[0].dims.n_g == 2  # grouped kv_b_proj, broadcast to 4 query heads


def test_detection_reads_dims_and_groups_from_the_graph():
    model = gqla_compile.optimize(HandWrittenLatentLM().eval(), path="grouped", target="h100", compile=False)
    layer = model.gqla_optimization.layers[0]
    assert layer.module_path == "blocks.0"
    d = layer.dims
    assert (d.n_h, d.n_g, d.d_c, d.d_R, d.d_n, d.d_v) == (6, 3, 20, 8, 12, 10)
    detect = layer.records[0]
    assert detect.pass_name == "detect" and detect.summary.matched == 1
    assert detect.summary.attention == "eager"


@pytest.mark.parametrize("path, rope_key", LAYOUTS)
def test_generate_same_tokens_and_cache_size(path, rope_key):
    reference = MODELS["deepseek_v3"]()
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path=path, target="h100", rope_key=rope_key,
                                      compile=False)
    assert optimized.gqla_optimization.plan.rope_key == rope_key
    prompt = torch.randint(0, reference.config.vocab_size, (2, 7))
    kwargs = dict(max_new_tokens=DECODE_STEPS, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    expected = reference.generate(prompt, **kwargs)
    actual = optimized.generate(prompt, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    dims = optimized.gqla_optimization.layers[0].dims
    cached_tokens = prompt.shape[1] + DECODE_STEPS - 1
    per_token = expected_cache_elements(dims, path, rope_key)
    assert cache_elements(actual.cache) == 2 * cached_tokens * per_token * prompt.shape[0]


@pytest.fixture(scope="module", params=[(m, p) for m in ("deepseek_v3", "gqla") for p in PATHS],
                ids=lambda mp: "-".join(mp))
def eager_pair(request):
    """(reference, optimized, path) for MLA (DeepSeek-V3) and GQLA (n_g = 2 < n_h = 4) on each path."""
    name, path = request.param
    reference = MODELS[name]()
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path=path, target="h100", compile=False)
    return reference, optimized, path


def _left_padded_prompt(vocab: int, length: int, pad: int = 3):
    prompt = torch.randint(1, vocab, (2, length))
    mask = torch.ones_like(prompt)
    prompt[0, :pad], mask[0, :pad] = 0, 0  # left padding on the first row
    return prompt, mask


def test_generate_modes_left_padding_beam_sampling_static_cache(eager_pair):
    reference, optimized, path = eager_pair
    prompt, mask = _left_padded_prompt(reference.config.vocab_size, 8)
    common = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=0)
    for mode in (dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(cache_implementation="static")):
        expected = reference.generate(prompt, **common, **mode)
        assert torch.equal(optimized.generate(prompt, **common, **mode), expected), mode
    torch.manual_seed(5)
    sampled = optimized.generate(prompt, **common, do_sample=True, top_k=5)
    torch.manual_seed(5)
    assert torch.equal(sampled, reference.generate(prompt, **common, do_sample=True, top_k=5))
    assert_rewritten_for_real(optimized, path)


def test_static_cache_holds_the_rewritten_layout(eager_pair):
    reference, optimized, path = eager_pair
    prompt = torch.randint(0, reference.config.vocab_size, (2, 6))
    cache = StaticCache(config=optimized.config, max_cache_len=16)
    with torch.no_grad():
        expected = reference(prompt).logits
        logits = optimized(prompt, cache=cache, use_cache=True).logits
    assert relative_error(logits, expected) < 1e-4
    assert_cache_layout(cache, optimized, batch=2, tokens=16)  # a static cache is allocated at full length


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_prefill_longer_than_the_decode_threshold(eager_pair, padded):
    """40 tokens in one step: past FOLD_QUERY_HEADS_UP_TO, the attention core's prefill branch."""
    from gqla_compile.attention import FOLD_QUERY_HEADS_UP_TO

    reference, optimized, _ = eager_pair
    length = 40
    assert length > FOLD_QUERY_HEADS_UP_TO
    prompt, mask = _left_padded_prompt(reference.config.vocab_size, length, pad=7)
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        expected = reference(prompt, attention_mask=mask).logits
        actual = optimized(prompt, attention_mask=mask).logits
    real = mask.bool()  # padded positions' logits are not defined by either model
    assert relative_error(actual[real], expected[real]) < 1e-4


@pytest.mark.parametrize("name", ["deepseek_v3", "gqla"])
def test_folded_output_absorption_end_to_end(name):
    """A latent narrower than the heads makes the plan fold W_UV into o_proj; the model still decodes exactly."""
    factory = {"deepseek_v3": tiny_deepseek_v3, "gqla": tiny_gqla}[name]
    reference = _hf_model(factory, kv_lora_rank=8, **({"attention_output_bias": True} if name == "gqla" else {}))
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path="absorbed", target="h100", compile=False)
    state = optimized.gqla_optimization
    assert state.plan.output_absorption == "folded"
    absorb = next(r for r in state.layers[0].records if r.pass_name == "absorb")
    assert absorb.summary.output_absorption == "folded"
    assert any(k.startswith("o_proj_folded") for k in absorb.summary.folded_weights)
    dims = state.layers[0].dims
    for layer in state.layers:
        core = dict(optimized.named_modules())[layer.module_path].gqla_runtime.core
        assert core.value_up is None and tuple(core.o_weight.shape) == (dims.hidden_size, dims.n_h * dims.d_c)
    assert_rewritten_for_real(optimized, "absorbed")
    _check_equivalent(reference, optimized, reference.config.vocab_size)
    prompt = torch.randint(0, reference.config.vocab_size, (1, 7))
    kwargs = dict(max_new_tokens=DECODE_STEPS, do_sample=False, pad_token_id=0)
    assert torch.equal(optimized.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))


def test_save_pretrained_keeps_the_users_weights(tmp_path):
    reference = MODELS["deepseek_v3"]()
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path="absorbed", target="h100", compile=False)
    assert optimized.state_dict().keys() == reference.state_dict().keys()
    optimized.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_model_without_latent_attention_is_left_unchanged():
    model = _hf_model(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no latent attention"):
        result = gqla_compile.optimize(model, target="h100", compile=False)
    assert result is model and getattr(model, "gqla_optimization", None) is None
    assert all("gqla_runtime" not in name for name, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(NoLatentAttentionError, match="no latent attention"):
        gqla_compile.optimize(model, path="absorbed", target="h100", compile=False)


def test_bad_arguments():
    model = MODELS["deepseek_v3"]()
    with pytest.raises(ValueError, match="path must be"):
        gqla_compile.optimize(model, path="fastest")
    gqla_compile.optimize(model, path="grouped", target="h100", compile=False)
    with pytest.raises(gqla_compile.errors.GqlaError, match="already optimized"):
        gqla_compile.optimize(model, path="absorbed", target="h100", compile=False)


# --- decode-graph op counts -------------------------------------------------------------------------------


def _decode_graph_linears(model, context: int):
    """Run one decode step under torch.compile with a recording backend; return (weight, input) shapes
    of every linear/matmul-like op in the captured graph(s)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    tokens = torch.randint(0, model.config.vocab_size, (1, context))
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(tokens[:, :-1], cache=cache, use_cache=True)
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, backend=record, fullgraph=False)
        compiled(tokens[:, -1:], cache=cache, use_cache=True)
    torch._dynamo.reset()
    shapes = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch._C._nn.linear, torch.nn.functional.linear, torch.matmul):
                a, b = (arg.meta["example_value"].shape for arg in node.args[:2])
                shapes.append((node.target.__name__, tuple(a), tuple(b)))
    return shapes


def test_absorbed_decode_graph_has_no_up_projection_matmul():
    reference = MODELS["deepseek_v3"]()
    kv_b = tuple(reference.model.layers[0].self_attn.kv_b_proj.weight.shape)
    before = _decode_graph_linears(reference, context=12)
    assert sum(kv_b in (a, b) for _, a, b in before) == 2  # the unmodified model re-expands the cache
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path="absorbed", target="h100", compile=False)
    after = _decode_graph_linears(optimized, context=12)
    assert not [op for op in after if kv_b in op[1:]]
    # The only use of W_UK: one batched matmul per layer mapping the new token's query into latent space.
    n_g, d_n, d_c = 4, 16, 32
    assert sum(b == (n_g, 1, d_n, d_c) for _, _, b in after) == 2


def test_grouped_decode_graph_expands_only_the_new_token():
    reference = MODELS["deepseek_v3"]()
    kv_b = tuple(reference.model.layers[0].self_attn.kv_b_proj.weight.shape)
    before = _decode_graph_linears(reference, context=12)
    assert any(b == kv_b and a[-2] == 12 for _, a, b in before)  # whole context re-expanded each step
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path="grouped", target="h100", compile=False)
    expansions = [a for _, a, b in _decode_graph_linears(optimized, context=12) if b == kv_b]
    assert len(expansions) == 2 and all(a[-2] == 1 for a in expansions)


def test_value_up_projection_folded_or_bmm_agree():
    """W_UV applied after attention as a per-group bmm equals W_UV folded into o_proj (W_O~)."""
    from gqla_compile.passes.fold import fold_value_up_projection
    from gqla_compile.runtime import LatentAttentionCore

    n_h, n_g, d_c, d_r, d_v, hidden = 6, 3, 10, 4, 5, 12
    w_uv, w_o, b_o = torch.randn(n_g, d_v, d_c), torch.randn(hidden, n_h * d_v), torch.randn(hidden)
    bmm = LatentAttentionCore(w_o, b_o, 0.3, latent_value_dims=d_c, value_up=w_uv)
    folded = LatentAttentionCore(fold_value_up_projection(w_o, w_uv, n_h), b_o, 0.3, latent_value_dims=d_c)
    query, key = torch.randn(2, n_h, 3, d_c + d_r), torch.randn(2, 1, 9, d_c + d_r)
    empty = key[..., :0]
    assert relative_error(bmm(query, key, empty, None), folded(query, key, empty, None)) < 1e-6


# --- Inductor -----------------------------------------------------------------------------------------------


COMPILED_MODELS = ("deepseek_v3", "deepseek_v3_q_lora", "deepseek_v2", "gqla", "hand_written_gqla")


@pytest.fixture(scope="session", params=[(m, p) for m in COMPILED_MODELS for p in PATHS], ids=lambda mp: "-".join(mp))
def compiled_model(request):
    name, path = request.param
    reference = MODELS[name]()
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path=path, target="h100", compile=True)
    return name, reference, optimized


@pytest.mark.slow
def test_compiled_paths_match_and_generate_same_tokens(compiled_model):
    name, reference, optimized = compiled_model
    vocab = getattr(getattr(reference, "config", None), "vocab_size", None) or reference.vocab
    _check_equivalent(reference, optimized, vocab)
    stats = optimized.gqla_optimization.compile
    assert stats.graphs >= 1 and stats.graph_breaks == 0
    if hasattr(reference, "generate"):
        prompt = torch.randint(0, vocab, (1, 9))
        kwargs = dict(max_new_tokens=DECODE_STEPS, do_sample=False, pad_token_id=0)
        assert torch.equal(optimized.generate(prompt, **kwargs), reference.generate(prompt, **kwargs))
