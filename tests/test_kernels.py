"""The decode core's oneDNN matmul (kernels.py) against torch.matmul, and a 16-head DeepSeek-V3 whose absorbed
decode runs on it: the same greedy tokens and logits (1e-4) as the unmodified model through ``generate`` with a
DynamicCache and a StaticCache, eager and compiled, and the profiler shows the oneDNN op ran."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import randomize_biases_and_norms, relative_error
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile import kernels
from gqla_compile.tiny import tiny_deepseek_v3

ROWS = 16  # query rows per cached row: the scores run on oneDNN too (kernels.SCORE_ROWS_ONEDNN)
OP_NAME = "gqla_compile::onednn_matmul"

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="this torch build has no oneDNN")


def _ran_onednn(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.key == OP_NAME for event in prof.key_averages())


def _layouts():
    """(x, y) pairs laid out as the decode core passes them: [B, h, ., .] views of cache-like buffers."""
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(2, 1, 40, 36, generator=g)  # a StaticCache-like buffer [B, 1, max_len, d_c + d_R]
    cached = buffer[:, :, :33]  # its first 33 slots: leading dims strided by max_len
    query = torch.randn(2, 1, ROWS, 36, generator=g)
    probs = torch.randn(2, 1, ROWS, 33, generator=g)
    return {
        "query-major scores (cached rows as a transposed weight)": (query, cached.transpose(-1, -2)),
        "keys-major scores": (cached, query.transpose(-1, -2)),
        "values, a leading column slice of wider rows": (probs, cached[..., :32]),
        "values, dense rows": (probs, torch.randn(2, 1, 33, 32, generator=g)),
        "values, a slice whose last row ends the storage": (probs[:1], torch.randn(1, 1, 33, 36, generator=g)[..., :32]),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_matmul_matches_torch_matmul(layout, dtype):
    x, y = (t.to(dtype) for t in _layouts()[layout])
    with torch.no_grad():
        assert _ran_onednn(lambda: kernels.score_matmul(x, y, ROWS))
        got = kernels.score_matmul(x, y, ROWS)
    want = torch.matmul(x.double(), y.double())
    assert got.shape == want.shape and got.dtype == dtype
    assert relative_error(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_torch_matmul_where_onednn_is_slower_or_cannot_read_the_operands():
    """Scores with fewer query rows per cached row than SCORE_ROWS_ONEDNN (MKL streams them faster),
    broadcast leading dims, rows wider than the slice by more than MAX_EXTRA_COLUMNS, and operands that need
    a gradient go through torch.matmul; values with few rows still run on oneDNN."""
    x = torch.randn(1, 2, ROWS, 16)
    few = kernels.SCORE_ROWS_ONEDNN - 1
    cases = {
        "few rows": (torch.randn(1, 2, few, 16), torch.randn(1, 2, 16, 8), few),
        "broadcast": (x, torch.randn(1, 1, 16, 8), ROWS),
        "wide rows": (x, torch.randn(1, 2, 16, 32)[..., :8], ROWS),
        "gradient": (x.clone().requires_grad_(), torch.randn(1, 2, 16, 8), ROWS),
    }
    for name, (a, b, rows) in cases.items():
        assert not _ran_onednn(lambda: kernels.score_matmul(a, b, rows)), name
        torch.testing.assert_close(kernels.score_matmul(a, b, rows), torch.matmul(a, b), msg=name)
    probs, values = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 16, 8)
    assert _ran_onednn(lambda: kernels.value_matmul(probs, values))
    torch.testing.assert_close(kernels.value_matmul(probs, values), torch.matmul(probs, values))


@pytest.fixture(scope="module")
def reference():
    config = tiny_deepseek_v3(num_attention_heads=ROWS, num_key_value_heads=ROWS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return randomize_biases_and_norms(model)


def _generate(model, prompt, **kwargs):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_absorbed_decode_on_onednn_matches_original(reference, compile):
    optimized = gqla_compile.optimize(copy.deepcopy(reference), path="absorbed", target="cpu", compile=compile)
    prompt = torch.randint(0, reference.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    for kwargs in ({}, {"cache_implementation": "static"}):
        want = _generate(reference, prompt, **kwargs)
        assert len(set(want.sequences[0, 6:].tolist())) > 1  # not one repeated token
        assert _ran_onednn(lambda: _generate(optimized, prompt, **kwargs))
        got = _generate(optimized, prompt, **kwargs)
        assert torch.equal(got.sequences, want.sequences), kwargs
        for step, (a, e) in enumerate(zip(got.logits, want.logits)):
            assert relative_error(a, e) < 1e-4, (kwargs, step, relative_error(a, e))
    if compile:
        assert optimized.gqla_optimization.compile.graph_breaks == 0
