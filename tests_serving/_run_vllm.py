"""Run one vLLM engine on token prompts (greedy) and write what the serving tests compare, as JSON.

``python _run_vllm.py REQUEST.json RESULT.json``: REQUEST has ``model``, ``prompts`` (token id lists),
``max_tokens`` and ``engine`` (extra ``LLM`` keyword arguments). RESULT has, per prompt, the greedy
tokens, the log-probability of each generated token and of each prompt token after the first, and, per
tensor-parallel worker, its KV cache spec per layer and the served GQLA path. A separate process per
engine keeps engines from sharing state (vLLM spawns its own engine and worker processes anyway).
"""

import json
import sys


def probe(worker) -> dict:
    """Runs in each worker: what its KV cache holds per layer and which attention classes it built."""
    runner = worker.model_runner
    model = runner.get_model()
    specs = {name: {"kind": type(spec).__name__, "num_kv_heads": spec.num_kv_heads, "head_size": spec.head_size,
                    "page_size_bytes": spec.page_size_bytes, "block_size": spec.block_size}
             for name, spec in runner.get_kv_cache_spec().items()}
    plan = getattr(model, "serving_plan", None)
    return {"rank": worker.rank, "kv_cache_spec": specs, "path": None if plan is None else plan.path,
            "attention": sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")})}


def main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.load(open(request_path))
    llm = LLM(model=request["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0,
              **request["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=0, prompt_logprobs=0,
                            detokenize=False, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params)
    result = {"tokens": [], "logprobs": [], "prompt_logprobs": []}
    for prompt, out in zip(request["prompts"], outputs):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        result["tokens"].append(tokens)
        result["logprobs"].append([step[t].logprob for t, step in zip(tokens, completion.logprobs)])
        result["prompt_logprobs"].append([step[t].logprob for t, step in zip(prompt[1:], out.prompt_logprobs[1:])])
    result["workers"] = llm.collective_rpc(probe)
    json.dump(result, open(result_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
