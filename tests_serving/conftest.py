"""Shared set-up of the serving tests (vLLM): tiny random checkpoints, a vLLM runner and the transformers
reference. Run with the vLLM environment's Python:
``.venv-vllm/bin/python -m pytest -n 0 -m serving tests_serving`` (.ci/run builds .venv-vllm) (see docs/serving.md).

Each vLLM engine runs in its own process (``_run_vllm.py``): a start costs 20-40 s on two cores, so tests
share engines through session-scoped fixtures and group their assertions per engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

RUNNER = Path(__file__).with_name("_run_vllm.py")
ENGINE_DEFAULTS = {"max_model_len": 256, "max_num_seqs": 4}
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
              "TOKENIZERS_PARALLELISM": "false"}


REPO = Path(__file__).resolve().parents[1]


def _python_path() -> str:
    """This checkout first on vLLM's processes' path, whichever checkout the environment has installed. vLLM
    finds the plugin through the installed package's ``gqla`` entry point (pyproject), so the package must be
    installed there (``pip install -e .``, as .ci/run does)."""
    from importlib.metadata import entry_points

    if not any(ep.name == "gqla" for ep in entry_points(group="vllm.general_plugins")):
        pytest.fail("no 'gqla' vLLM plugin is installed in this environment: run `python -m pip install -e .` "
                    "from this checkout with the vLLM environment's Python (see docs/serving.md)")
    return os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.serving)


def randomize(model: nn.Module, seed: int = 0, std: float = 0.15) -> nn.Module:
    """Weights large enough that attention and RoPE matter: matrices ~ N(0, std), norm gains U(0.5, 1.5),
    biases ~ N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def save_checkpoint(model: nn.Module, folder: Path) -> Path:
    """save_pretrained (safetensors) into ``folder``; returns it."""
    model.save_pretrained(folder)
    return folder


@dataclass
class Completion:
    """Greedy tokens and log-probabilities of one engine (or of transformers) on a batch of prompts."""

    tokens: list[list[int]]
    logprobs: list[list[float]]  # each generated token's
    prompt_logprobs: list[list[float]]  # each prompt token's after the first
    workers: list[dict] | None = None  # vLLM only: per tp rank, KV cache spec and served path


def run_vllm(model_dir: Path, prompts: list[list[int]], max_tokens: int, *, env: dict | None = None,
             timeout: float = 600, **engine) -> Completion:
    """Greedy decoding of ``prompts`` by vLLM (its own process); raises RuntimeError with the log on failure."""
    out = Path(model_dir).parent / f"vllm-{os.getpid()}-{abs(hash(json.dumps(engine, sort_keys=True)))}.json"
    request = out.with_suffix(".request.json")
    request.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "max_tokens": max_tokens,
                                   "engine": {**ENGINE_DEFAULTS, **engine}}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(request), str(out)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENGINE_ENV, **(env or {}),
                                                "PYTHONPATH": _python_path()})
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-40000:]}")
    result = json.loads(out.read_text())
    completion = Completion(result["tokens"], result["logprobs"], result["prompt_logprobs"], result["workers"])
    completion.log = proc.stdout + proc.stderr
    return completion


def vllm_failure(model_dir: Path, prompts: list[list[int]], *, env: dict | None = None, **engine) -> str:
    """The log of a vLLM start that must fail; fails the test if the engine starts."""
    try:
        completion = run_vllm(model_dir, prompts, 1, env=env, **engine)
    except RuntimeError as error:
        return str(error)
    pytest.fail(f"vLLM served {model_dir} with {engine} although it should refuse: {completion.workers}")


def transformers_reference(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> Completion:
    """The unmodified transformers model (eager, float32, full forward per step): greedy tokens and
    log-probabilities (no generation config in the way: the end-of-sequence token is not special here)."""
    import gqla_compile  # noqa: F401  registers model_type "gqla"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokens, logprobs, prompt_logprobs = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            sequence = torch.tensor(prompt)
            for _ in range(max_tokens):
                next_token = model(sequence[None]).logits[0, -1].argmax()
                sequence = torch.cat((sequence, next_token[None]))
            logp = torch.log_softmax(model(sequence[None]).logits[0].float(), dim=-1)
            per_token = logp[:-1].gather(1, sequence[1:, None])[:, 0].tolist()
            tokens.append(sequence[len(prompt):].tolist())
            prompt_logprobs.append(per_token[:len(prompt) - 1])
            logprobs.append(per_token[len(prompt) - 1:])
    return Completion(tokens, logprobs, prompt_logprobs)


def tiny_llama_gqla(folder: Path, *, groups: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A TransGQLA result (GqlaForCausalLM) of a tiny random Llama with ``groups`` KV heads: latent 48,
    RoPE key 16 (neither is the 512 + 64 of vLLM's MLA kernels), saved with save_pretrained."""
    import gqla_compile
    from gqla_compile.conversion.calibration import random_token_sequences
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32 * heads, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=groups, head_dim=32,
                         max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    llama = randomize(LlamaForCausalLM(config).eval(), seed)
    calibration = random_token_sequences(config.vocab_size, num_samples=8, seq_len=32, seed=1)
    gqla = gqla_compile.convert(llama, kv_lora_rank=48, qk_rope_head_dim=16, calibration=calibration, progress=False)
    assert type(gqla).__name__ == "GqlaForCausalLM" and gqla.config.num_key_value_heads == groups < heads
    return save_checkpoint(gqla, folder)


def tiny_deepseek_regrouped(folder: Path, *, seed: int = 0) -> Path:
    """A tiny random DeepSeek-V3 (4 heads, q_lora, latent 64 + RoPE 16, one MoE layer) regrouped in its own
    family into 2 groups by ``gqla_compile.convert(..., num_groups=2)``, saved with save_pretrained."""
    import gqla_compile
    from gqla_compile.conversion.calibration import random_token_sequences
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
                              kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                              first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                              topk_group=1, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = randomize(DeepseekV3ForCausalLM(config).eval(), seed)
    calibration = random_token_sequences(config.vocab_size, num_samples=8, seq_len=32, seed=1)
    regrouped = gqla_compile.convert(model, num_groups=2, calibration=calibration, progress=False)
    assert type(regrouped).__name__ == "DeepseekV3ForCausalLM"
    assert regrouped.config.gqla_conversion["num_groups"] == 2
    return save_checkpoint(regrouped, folder)


def make_prompts(vocab: int, lengths: tuple[int, ...] = (5, 17, 33, 60), seed: int = 7) -> list[list[int]]:
    """Random token prompts of different lengths (token 0 avoided)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]
