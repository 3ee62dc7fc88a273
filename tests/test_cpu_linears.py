"""The compiled model's linears on oneDNN (gqla_compile::onednn_linear): the op against F.linear and its
registration, a real model compiled with the routing forced on (its linears counted, its logits and greedy
tokens those of the unmodified model), and the cases that keep MKL (measured slower, gradients)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import randomize_biases_and_norms, relative_error
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile import cpu_linears
from gqla_compile.cpu_linears import onednn_linear, route_linears_to_onednn
from gqla_compile.tiny import tiny_deepseek_v3

pytestmark = pytest.mark.skipif(not cpu_linears.AVAILABLE, reason="this torch build has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
def test_op_is_linear(bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=generator)
    weight, b = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    got = onednn_linear(x, weight, b if bias else None)
    assert got.shape == (2, 5, 40)
    assert (got - F.linear(x, weight, b if bias else None)).abs().max() < 1e-4
    torch.library.opcheck(onednn_linear, (x, weight, b if bias else None))
    assert onednn_linear(x[:, :0], weight, None).shape == (2, 0, 40)


def _optimized(monkeypatch, faster: bool):
    monkeypatch.setattr(cpu_linears, "onednn_is_faster", lambda dtype=torch.float32: faster)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny_deepseek_v3(), attn_implementation="sdpa").eval()
    reference = randomize_biases_and_norms(reference)
    return reference, gqla_compile.optimize(copy.deepcopy(reference), target="cpu", compile=True)


def test_compiled_model_with_linears_on_onednn_matches_the_unmodified_model(monkeypatch):
    reference, optimized = _optimized(monkeypatch, faster=True)
    vocab = reference.config.vocab_size
    prompt = torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(optimized(prompt).logits, reference(prompt).logits) < 1e-4
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = reference.generate(prompt, **kwargs)
        assert len(set(want[:, 21:].flatten().tolist())) > 1
        assert torch.equal(optimized.generate(prompt, **kwargs), want)
    stats = optimized.gqla_optimization.compile
    assert stats.onednn_linears > 0 and stats.graph_breaks == 0
    assert "on oneDNN" in str(gqla_compile.report(optimized))


def test_linears_stay_on_mkl_where_onednn_is_not_faster(monkeypatch):
    _, optimized = _optimized(monkeypatch, faster=False)
    with torch.no_grad():
        optimized(torch.randint(0, 64, (1, 19)))
    assert optimized.gqla_optimization.compile.onednn_linears == 0


def test_a_graph_traced_with_gradients_keeps_its_linears(monkeypatch):
    monkeypatch.setattr(cpu_linears, "onednn_is_faster", lambda dtype=torch.float32: True)
    routed = []

    def backend(gm, example_inputs):
        routed.append(route_linears_to_onednn(gm))
        return gm

    layer = torch.nn.Linear(8, 4)
    torch.compile(layer, backend=backend)(torch.randn(3, 8))
    with torch.no_grad():
        torch.compile(torch.nn.Linear(8, 4), backend=backend)(torch.randn(3, 8))
    assert routed == [0, 1]


def test_the_measurement_answers_once_per_dtype():
    cpu_linears.onednn_is_faster.cache_clear()
    first = cpu_linears.onednn_is_faster(torch.float32)
    assert cpu_linears.onednn_is_faster(torch.float32) is first
    assert cpu_linears.onednn_is_faster.cache_info().hits == 1
    assert cpu_linears.onednn_is_faster(torch.float16) is False
