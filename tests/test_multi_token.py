"""Multi-token decoding (s_q > 1) on both rewritten paths: verification steps, prompt lookup, assistants.

transformers' candidate verification feeds several new tokens per step and crops the cache when some are
rejected; both paths must give the same greedy tokens as the unmodified model without assistance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import randomize_biases_and_norms, relative_error
from transformers import AutoModelForCausalLM, DynamicCache

import gqla_compile
from gqla_compile.tiny import tiny_deepseek_v3, tiny_gqla

PATHS = gqla_compile.paths.PATH_NAMES


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomize_biases_and_norms(AutoModelForCausalLM.from_config(tiny_gqla()).eval())


@pytest.fixture(scope="module", params=PATHS)
def optimized(request, reference):
    return request.param, gqla_compile.optimize(copy.deepcopy(reference), target="h20", path=request.param,
                                                s_q=4, compile=False)


def _repetitive_prompt(vocab: int) -> torch.Tensor:
    chunk = torch.randint(0, vocab, (1, 10))
    return torch.cat([chunk, chunk, chunk[:, :4]], dim=1)


def test_prompt_lookup_gives_the_unassisted_tokens(reference, optimized):
    path, model = optimized
    prompt = _repetitive_prompt(reference.config.vocab_size)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, prompt_lookup_num_tokens=3, **kwargs), expected), path


def test_assistant_model_gives_the_unassisted_tokens(reference, optimized):
    path, model = optimized
    torch.manual_seed(1)
    assistant = AutoModelForCausalLM.from_config(tiny_gqla(num_hidden_layers=1)).eval()
    prompt = _repetitive_prompt(reference.config.vocab_size)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, assistant_model=assistant, **kwargs), expected), path


MULTI_TOKEN_MODELS = {
    "deepseek_v3_q_lora": lambda: tiny_deepseek_v3(q_lora_rank=24, attention_bias=True),
    "gqla": lambda: tiny_gqla(attention_bias=True, attention_output_bias=True),  # n_g = 2 < n_h = 4
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(MULTI_TOKEN_MODELS))
def test_verification_step_matches_the_unmodified_model(name, path):
    """s_q = 4 new tokens in one step over a cache equals the unmodified model, and the optimized model's
    own single steps."""
    torch.manual_seed(0)
    reference = randomize_biases_and_norms(AutoModelForCausalLM.from_config(MULTI_TOKEN_MODELS[name]()).eval())
    model = gqla_compile.optimize(copy.deepcopy(reference), target="h20", path=path, s_q=4, compile=False)
    tokens = torch.randint(0, model.config.vocab_size, (2, 14))

    def verify_step(m):
        cache = DynamicCache()
        m(tokens[:, :10], cache=cache, use_cache=True)
        return m(tokens[:, 10:], cache=cache, use_cache=True).logits  # s_q = 4 in one step

    with torch.no_grad():
        verified, expected = verify_step(model), verify_step(reference)
        cache = DynamicCache()
        model(tokens[:, :10], cache=cache, use_cache=True)
        singles = torch.cat([model(tokens[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(10, 14)], 1)
    assert relative_error(verified, expected) < 1e-4
    assert relative_error(verified, singles) < 1e-4
    assert model.gqla_optimization.plan.s_q == 4
    if name == "gqla":
        assert model.gqla_optimization.layers[0].dims.n_g == 2 < model.gqla_optimization.layers[0].dims.n_h
