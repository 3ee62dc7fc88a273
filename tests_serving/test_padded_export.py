"""Stock vLLM serves the padded DeepSeek-V3 export of a (d_R 32, d_c 76) GQLA model (issue 22).

``gqla_compile.export`` pads the latent to the 512 + 64 that vLLM's MLA kernels take; vLLM then serves the export
as a plain DeepSeek-V3 checkpoint (its own architecture, its MLA attention: absorbed decode, expanded prefill).
With the gqla_compile plugin loaded (only its RoPE correction matters here: ``serving.rope.install_rotary_fix``)
the greedy tokens and log-probabilities are those of the unpadded GQLA model in transformers. Without the
plugin the export loads and runs, and differs only by vLLM's CPU RoPE bug (docs/vllm_cpu_rope_bug.md): the
prompt log-probabilities agree at position 0 (one key: the score does not matter) and drift after, and the
same export with its RoPE rows zeroed agrees with transformers without the plugin.

Five engine starts, each in its own process (vLLM loads plugins per process, and the fix cannot be undone
inside one). Run with ``.venv-vllm/bin/python -m pytest -n 0 -m serving tests_serving`` (.ci/run builds .venv-vllm).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import gqla_compile
from conftest import randomize, run_vllm, transformers_reference
from gqla_compile.tiny import tiny_gqla

#: (d_R 32, d_c 76) with per-layer RoPE frequency tables drawn from a 64-dim table (TransGQLA's FreqFold form).
HEADLINE = dict(kv_lora_rank=76, qk_rope_head_dim=32, qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=24,
                softmax_scale=0.2, rope_frequency_dim=64, max_position_embeddings=256,
                rope_layer_frequency_indices=[list(range(0, 32, 2)),
                                              [5, 0, 9, 2, 31, 4, 12, 6, 17, 20, 11, 27, 1, 30, 23, 15]])
PROMPTS = [[5, 17, 99, 3, 250, 42, 8, 61, 77, 120, 9, 31, 200, 14],
           [33, 7, 180, 66, 2, 91, 140, 12, 250, 19, 64, 3, 88, 101, 45, 230, 11, 57, 176, 4, 99, 23],
           [150, 60, 21, 9]]
STEPS = 10
#: Log-probabilities: float32 with other kernels and summation orders (vLLM's absorbed decode, 512-dim latent;
#: measured: 3.3e-06 at most with the plugin).
LOGPROB_ATOL = 1e-4
#: Without the plugin, the smallest largest prompt log-probability error any prompt shows from position 1 on
#: (measured: 0.14 at position 1 already).
BUG_DRIFT = 1e-2


def _serve(folder, *, plugin: bool, mla: bool = True):
    """vLLM on ``folder`` with the gqla_compile plugin loaded or not (``VLLM_PLUGINS``); ``mla`` False serves
    DeepSeek-V3 on vLLM's MHA attention (``VLLM_MLA_DISABLE``) instead of its MLA attention."""
    return run_vllm(folder, PROMPTS, STEPS, env={"VLLM_PLUGINS": "gqla" if plugin else "",
                                                 "VLLM_MLA_DISABLE": "0" if mla else "1"})


def _reference(model: torch.nn.Module, folder: Path):
    """``model`` saved as it is (the unpadded GQLA model) and its greedy outputs in transformers."""
    model.save_pretrained(folder)
    return transformers_reference(folder, PROMPTS, STEPS)


def _export(model: torch.nn.Module, tmp: Path, name: str) -> tuple[Path, object]:
    """The model's default (padded) export, and the unpadded model's reference outputs in transformers."""
    folder = gqla_compile.export(model, tmp / name)
    assert json.loads((folder / "config.json").read_text())["kv_lora_rank"] == 512  # padded by default
    reference = _reference(model, tmp / f"{name}-gqla")
    assert all(len(set(tokens)) > 1 for tokens in reference.tokens)  # no greedy output is one repeated token
    return folder, reference


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The GQLA model's padded export, and the same model's with its RoPE rows zeroed, with references."""
    tmp = tmp_path_factory.mktemp("padded")
    torch.manual_seed(0)
    model = randomize(AutoModelForCausalLM.from_config(tiny_gqla(**HEADLINE)).eval())
    no_rope = randomize(AutoModelForCausalLM.from_config(tiny_gqla(**HEADLINE)).eval(), seed=1)
    d_n, d_r, d_c = HEADLINE["qk_nope_head_dim"], HEADLINE["qk_rope_head_dim"], HEADLINE["kv_lora_rank"]
    with torch.no_grad():
        for layer in no_rope.model.layers:
            attention = layer.self_attn
            attention.q_b_proj.weight.view(-1, d_n + d_r, attention.q_b_proj.weight.shape[1])[:, d_n:] = 0
            attention.kv_a_proj_with_mqa.weight[d_c:] = 0
    return {"padded": _export(model, tmp, "padded"), "no_rope": _export(no_rope, tmp, "no_rope")}


def _assert_same(served, reference) -> None:
    assert served.tokens == reference.tokens
    for got, want in zip(served.logprobs + served.prompt_logprobs, reference.logprobs + reference.prompt_logprobs,
                         strict=True):
        assert torch.allclose(torch.tensor(got), torch.tensor(want, dtype=torch.float32), atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("mla", [True, False], ids=["mla", "mha"])
def test_stock_vllm_serves_the_padded_export_with_the_gqla_models_tokens_when_the_plugin_is_loaded(exported, mla):
    """On both of vLLM's DeepSeek attentions: MLA (absorbed decode, expanded prefill) and plain MHA."""
    folder, reference = exported["padded"]
    served = _serve(folder, plugin=True, mla=mla)
    # vLLM's own DeepSeek attention: the plugin serves an export as a stock checkpoint (only its RoPE fix acts)
    assert all(worker["path"] is None for worker in served.workers), served.workers
    assert ("MLA backend." in served.log) == mla, served.log[-3000:]  # "Using CPU_MLA backend." (or AMX_MLA)
    _assert_same(served, reference)


def test_without_the_plugin_the_padded_export_runs_and_differs_only_by_vllms_cpu_rope_bug(exported):
    folder, reference = exported["padded"]
    served = _serve(folder, plugin=False)
    drift = []
    for got, want in zip(served.prompt_logprobs, reference.prompt_logprobs, strict=True):
        assert len(got) == len(want)
        assert abs(got[0] - want[0]) < LOGPROB_ATOL  # position 0: one key, RoPE cannot matter
        drift.append(max(abs(a - b) for a, b in zip(got[1:], want[1:])))
    assert all(len(tokens) == STEPS for tokens in served.tokens)
    assert min(drift) > BUG_DRIFT, drift  # from position 1 on: the upstream bug
    # the same export with its RoPE rows zeroed: nothing for the bug to touch, and vLLM agrees without the plugin
    folder, reference = exported["no_rope"]
    _assert_same(_serve(folder, plugin=False), reference)


def test_stock_vllm_serves_the_padded_export_of_a_real_transgqla_conversion(tmp_path):
    """The issue's case itself: a Llama (64-dim heads) converted by TransGQLA at (d_R 32, d_c 76) (no latent
    norm: the export's inert one, padded; FreqFold's frequencies of the 64-dim table), exported with the default
    padding and served by stock vLLM's MLA with the plugin: the converted model's tokens and log-probabilities."""
    from gqla_compile.conversion.calibration import random_token_sequences
    from gqla_compile.tiny import tiny_llama

    torch.manual_seed(0)
    llama = randomize(AutoModelForCausalLM.from_config(tiny_llama(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=256)).eval())
    converted = gqla_compile.convert(llama, kv_lora_rank=76, qk_rope_head_dim=32, progress=False,
                                     calibration=random_token_sequences(256, 4, 32, seed=1))
    assert converted.config.rope_frequency_dim == 64 and not converted.config.kv_a_layernorm
    folder, reference = _export(converted, tmp_path, "transgqla")
    _assert_same(_serve(folder, plugin=True), reference)


# --- the fix itself, on vLLM's rotary embedding (no engine) ---------------------------------------------------------


@pytest.fixture(scope="module")
def rotary():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        embedding = get_rope(64, max_position=256, is_neox_style=False, dtype=torch.float32,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    embedding._forward_method = embedding.forward_cpu  # what vLLM dispatches on CPU with its custom ops on
    return embedding


def _mla_inputs(tokens: int = 7, heads: int = 4):
    """Views laid out as DeepSeek's MLA layer passes them: q[..., d_n:] of [T, H, d_n + 64] and the RoPE key of
    the [T, 1, 512 + 64] down-projection output."""
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(tokens, heads, 16 + 64, generator=generator)
    latent = torch.randn(tokens, 1, 512 + 64, generator=generator)
    return torch.tensor([0, 1, 2, 3, 50, 200, 255])[:tokens], query, latent


def test_vllms_cpu_rotary_op_rotates_the_wrong_vectors_of_a_multi_head_query(rotary):
    """The upstream bug itself (docs/vllm_cpu_rope_bug.md): the op on DeepSeek's [T, H, 64] query view is far off
    vLLM's own forward_native, while the [T, 1, 64] key is exact."""
    from vllm import _custom_ops as ops

    positions, query, latent = _mla_inputs()
    want_q, want_k = rotary.forward_native(positions, query[..., 16:].clone(), latent[..., 512:].clone())
    broken_q, broken_k = query[..., 16:].clone(), latent[..., 512:].clone()
    ops.rotary_embedding(positions, broken_q, broken_k, 64, rotary.cos_sin_cache, False)  # what forward_cpu runs
    assert (broken_q - want_q).abs().max() > 1 and torch.equal(broken_k, want_k)


def test_install_rotary_fix_is_idempotent_logs_once_and_fixes_forward_cpu(caplog):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from gqla_compile.serving.rope import install_rotary_fix

    with caplog.at_level("INFO", logger="gqla_compile.serving.rope"):
        first, second = install_rotary_fix(), install_rotary_fix()
    assert (first, second) == (True, False)
    assert caplog.text.count("now hands it the flattened layout") == 1
    with set_current_vllm_config(VllmConfig()):  # built after the fix, as a plugin makes it
        fixed = get_rope(64, max_position=256, is_neox_style=False, dtype=torch.float32,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    positions, query, latent = _mla_inputs()
    want_q, want_k = fixed.forward_native(positions, query[..., 16:].clone(), latent[..., 512:].clone())
    got_q, got_k = fixed.forward_cpu(positions, query[..., 16:], latent[..., 512:])
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k) and torch.equal(query[..., 16:], want_q)
    # a flat [T, H * 64] query (Llama-style callers) goes to the op as it is, and is right too
    flat_q, _ = fixed.forward_cpu(positions, _mla_inputs()[1][..., 16:].reshape(7, -1).clone(), None)
    assert torch.equal(flat_q.view(7, 4, 64), want_q)
