"""Stock vLLM serves the padded DeepSeek-V3 export of a (d_R 32, d_c 76) GQLA model (issue 22).

``gqla_compile.export`` pads the latent to the 512 + 64 that vLLM's MLA kernels take; vLLM then serves the export
as a plain DeepSeek-V3 checkpoint (its own architecture, its MLA attention: absorbed decode, expanded prefill).
With the gqla_compile plugin loaded (only its RoPE correction matters here: ``serving.rope.install_rotary_fix``)
the greedy tokens and log-probabilities are those of the unpadded GQLA model in transformers. Without the
plugin the export loads and runs, and differs only by vLLM's CPU RoPE bug (docs/vllm_cpu_rope_bug.md): the
prompt log-probabilities agree at position 0 (one key: the score does not matter) and drift after, and the
same export with its RoPE rows zeroed agrees with transformers without the plugin.

Five engine starts, each in its own process (vLLM loads plugins per process, and the fix cannot be undone
inside one). Run with ``/work/vllm-env/bin/python -m pytest -n 0 -p no:cacheprovider tests_serving``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.tiny import tiny_gqla

pytestmark = pytest.mark.serving

REPO = Path(__file__).resolve().parents[1]
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

_ENGINE = textwrap.dedent('''
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        folder, prompts, steps, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        llm = LLM(model=folder, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
                  max_num_seqs=4, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, logprobs=0, prompt_logprobs=0)
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        record = {"outputs": []}
        for prompt, result in zip(prompts, results):
            completion = result.outputs[0]
            record["outputs"].append({
                "tokens": list(completion.token_ids),
                "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
                "prompt_logprobs": [None if step is None else step[token].logprob
                                    for step, token in zip(result.prompt_logprobs, prompt)],
            })
        with open(out, "w") as f:
            json.dump(record, f)
''')


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Weights where RoPE and the latent matter: matrices ~ N(0, 0.15), norm gains U(0.5, 1.5)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _reference(model: torch.nn.Module) -> list[dict]:
    """Greedy tokens and log-probabilities (of every prompt token after the first, and of each generated one)
    of ``model`` in transformers."""
    outputs = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)[0]
            logprobs = model(input_ids=tokens[None], use_cache=False).logits[0].double().log_softmax(-1)
        chosen = logprobs[:-1].gather(-1, tokens[1:, None])[:, 0].tolist()
        outputs.append({"tokens": tokens[len(prompt):].tolist(), "prompt_logprobs": chosen[:len(prompt) - 1],
                        "logprobs": chosen[len(prompt) - 1:]})
    return outputs


def _plugin_path(tmp: Path) -> tuple[str, str]:
    """(PYTHONPATH, plugin name) under which vLLM loads the gqla_compile plugin in every process it starts.

    The package's plugin (``gqla_compile.serving.plugin:register``, entry point ``gqla``; it installs the rotary
    fix) when this checkout has it; else a dist-info of this test's own declaring ``install_rotary_fix`` as the
    plugin. Either way vLLM itself loads it, in the engine core process too."""
    paths = [str(REPO)]
    if not any(ep.name == "gqla" for ep in entry_points(group="vllm.general_plugins")):
        target = ("gqla_compile.serving.plugin:register" if importlib.util.find_spec("gqla_compile.serving.plugin")
                  else "gqla_compile.serving.rope:install_rotary_fix")
        info = tmp / "plugin" / "gqla_padded_export_test-0.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gqla-padded-export-test\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\ngqla = {target}\n")
        paths.append(str(info.parent))
    return os.pathsep.join(paths), "gqla"


def _serve(folder: Path, tmp: Path, *, plugin: bool, mla: bool = True) -> dict:
    """One vLLM engine (its own process) on ``folder``: greedy tokens and log-probabilities of PROMPTS; ``mla``
    False serves DeepSeek-V3 on vLLM's MHA attention (``VLLM_MLA_DISABLE``) instead of its MLA attention."""
    script = tmp / "engine.py"
    script.write_text(_ENGINE)
    python_path, name = _plugin_path(tmp)
    env = {**os.environ, "PYTHONPATH": python_path, "VLLM_PLUGINS": name if plugin else "",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_MLA_DISABLE": "0" if mla else "1"}
    out = tmp / f"{folder.name}-{'plugin' if plugin else 'stock'}-{'mla' if mla else 'mha'}.json"
    run = subprocess.run([sys.executable, str(script), str(folder), json.dumps(PROMPTS), str(STEPS), str(out)],
                         env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    record = json.loads(out.read_text())
    record["log"] = run.stdout + run.stderr
    return record


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The GQLA model, its reference outputs in transformers, its padded export and the same with zero RoPE."""
    tmp = tmp_path_factory.mktemp("padded")
    torch.manual_seed(0)
    model = _randomized(AutoModelForCausalLM.from_config(tiny_gqla(**HEADLINE)))
    gqla_compile.export(model, tmp / "padded")
    no_rope = _randomized(AutoModelForCausalLM.from_config(tiny_gqla(**HEADLINE)))
    d_n, d_r, d_c = HEADLINE["qk_nope_head_dim"], HEADLINE["qk_rope_head_dim"], HEADLINE["kv_lora_rank"]
    with torch.no_grad():
        for layer in no_rope.model.layers:
            attention = layer.self_attn
            attention.q_b_proj.weight.view(-1, d_n + d_r, attention.q_b_proj.weight.shape[1])[:, d_n:] = 0
            attention.kv_a_proj_with_mqa.weight[d_c:] = 0
    gqla_compile.export(no_rope, tmp / "no_rope")
    reference = _reference(model)
    assert all(len(set(output["tokens"])) > 1 for output in reference)  # no prompt's greedy output is one token
    return {"tmp": tmp, "reference": reference, "no_rope_reference": _reference(no_rope)}


def _assert_same(served: list[dict], reference: list[dict]) -> None:
    for got, want in zip(served, reference, strict=True):
        assert got["tokens"] == want["tokens"]
        assert torch.allclose(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), atol=LOGPROB_ATOL, rtol=0)
        assert got["prompt_logprobs"][0] is None
        assert torch.allclose(torch.tensor(got["prompt_logprobs"][1:]), torch.tensor(want["prompt_logprobs"]),
                              atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("mla", [True, False], ids=["mla", "mha"])
def test_stock_vllm_serves_the_padded_export_with_the_gqla_models_tokens_when_the_plugin_is_loaded(exported, mla):
    """On both of vLLM's DeepSeek attentions: MLA (absorbed decode, expanded prefill) and plain MHA."""
    served = _serve(exported["tmp"] / "padded", exported["tmp"], plugin=True, mla=mla)
    assert "DeepseekV3ForCausalLM" in served["log"]  # vLLM's own architecture, no model class of ours
    assert ("MLA backend." in served["log"]) == mla, served["log"][-3000:]  # "Using CPU_MLA backend." (or AMX_MLA)
    _assert_same(served["outputs"], exported["reference"])


def test_without_the_plugin_the_padded_export_runs_and_differs_only_by_vllms_cpu_rope_bug(exported):
    served = _serve(exported["tmp"] / "padded", exported["tmp"], plugin=False)
    drift = []
    for got, want in zip(served["outputs"], exported["reference"]):
        assert len(got["tokens"]) == STEPS
        first, rest = got["prompt_logprobs"][1], got["prompt_logprobs"][2:]
        assert abs(first - want["prompt_logprobs"][0]) < LOGPROB_ATOL  # position 0: one key, RoPE cannot matter
        drift.append(max(abs(a - b) for a, b in zip(rest, want["prompt_logprobs"][1:])))
    assert min(drift) > BUG_DRIFT, drift  # from position 1 on: the upstream bug
    # the same export with its RoPE rows zeroed: nothing for the bug to touch, and vLLM agrees without the plugin
    no_rope = _serve(exported["tmp"] / "no_rope", exported["tmp"], plugin=False)
    _assert_same(no_rope["outputs"], exported["no_rope_reference"])


def test_stock_vllm_serves_the_padded_export_of_a_real_transgqla_conversion(tmp_path):
    """The issue's case itself: a Llama (64-dim heads) converted by TransGQLA at (d_R 32, d_c 76) (no latent
    norm: the export's inert one, padded; FreqFold's frequencies of the 64-dim table), exported with the default
    padding and served by stock vLLM's MLA with the plugin: the converted model's tokens and log-probabilities."""
    from gqla_compile.conversion.calibration import random_token_sequences
    from gqla_compile.tiny import tiny_llama

    torch.manual_seed(0)
    llama = _randomized(AutoModelForCausalLM.from_config(tiny_llama(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256)))
    converted = gqla_compile.convert(llama, kv_lora_rank=76, qk_rope_head_dim=32, progress=False,
                                     calibration=random_token_sequences(256, 4, 32, seed=1))
    assert converted.config.rope_frequency_dim == 64 and not converted.config.kv_a_layernorm
    gqla_compile.export(converted, tmp_path / "transgqla")
    reference = _reference(converted)
    assert all(len(set(output["tokens"])) > 1 for output in reference)
    served = _serve(tmp_path / "transgqla", tmp_path, plugin=True)
    _assert_same(served["outputs"], reference)


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


def test_apply_rotary_is_exact_where_vllms_cpu_op_is_not(rotary):
    from vllm import _custom_ops as ops

    from gqla_compile.serving.rope import apply_rotary

    positions, query, latent = _mla_inputs()
    want_q, want_k = rotary.forward_native(positions, query[..., 16:].clone(), latent[..., 512:].clone())
    broken_q, broken_k = query[..., 16:].clone(), latent[..., 512:].clone()
    ops.rotary_embedding(positions, broken_q, broken_k, 64, rotary.cos_sin_cache, False)  # what forward_cpu runs
    assert (broken_q - want_q).abs().max() > 1 and torch.equal(broken_k, want_k)  # the upstream bug
    q_view, k_view = query[..., 16:], latent[..., 512:]
    got_q, got_k = apply_rotary(rotary, positions, q_view, k_view)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(query[..., 16:], want_q) and torch.equal(latent[..., 512:], want_k)  # in place, as the op
    # a flat [T, H * 64] query goes to the op as it is
    flat_q, _ = apply_rotary(rotary, positions, _mla_inputs()[1][..., 16:].reshape(7, -1).clone(), None)
    assert torch.equal(flat_q.view(7, 4, 64), want_q)


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
