"""Whole requests (issue 24): a prompt, then the answer. Time to first token, decode tokens/s and total time for
the unmodified transformers model (eager, DynamicCache), transformers with a StaticCache and torch.compile, both
paths of ``gqla_compile.optimize`` (compiled, StaticCache) and, where .venv-vllm (.ci/run builds it; or ``--vllm-python``) runs
vLLM's CPU build, vLLM serving the same weights saved as a DeepSeek-V3 checkpoint; then the attention part of the
longest prefill against its FLOP roofline at the matmul rate measured in the same run (``targets.matmul_rates``).

    python -m benchmarks.request [--quick [--compile] [--vllm]] [--no-compile] [--no-vllm] [--out benchmarks/results]

The model is DeepSeek-V3-shaped where attention is concerned (16 heads, d_c 512, d_R 64, d_n 128, d_v 128, n_g =
n_h), with one layer and a small MLP so that the grid (prompts 256, 1k, 4k, 8k; answers 128, 256 and 512; batch 1
and 4) stays within about 15-30 minutes on one thread (the 8k x 4 prefills dominate: about 100 s per variant). One request per (prompt, batch) decodes the
longest answer; the shorter answers' figures are the same request's first tokens. A variant's request stops
decoding when its time budget is spent (the eager model re-expands the whole context at every step): its
remaining steps are counted at its last measured step time, and the record says how many were measured.
Compiled variants are warmed up first (``warm_up_shapes``: two short prompts, after which shapes are dynamic, and
one request per regime Inductor compiles apart), and the record counts the graphs dynamo compiled during the
timed requests (0: no recompiling per length). Each variant runs in a process of its own, on the same weights
saved as a checkpoint, so that none is timed in a process another variant has used.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import common

PART = "request"
#: Requests (or prefills) shorter than this are timed best of up to 3: on a shared machine the noise of one
#: short run is of the order of the differences measured.
SHORT_S = 2.0
VARIANTS = ("transformers eager", "transformers static+compile", "absorbed", "grouped")
logger = logging.getLogger(__name__)


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"prompts": [48, 160], "answers": [4, 8], "batches": [1, 2], "layers": 1, "hidden": 256,
                "budget_s": 5.0, "warmup_prompts": [20, 28], "vllm": False, "compile": False}
    # batch 4 stops at 4k: at 8k, the masked attention of transformers' compiled StaticCache variant materialises
    # 4 x 16 x 8k x 8.7k float32 scores (18 GB) and the machine (24 GiB) runs out
    return {"prompts": [256, 1024, 4096, 8192], "answers": [128, 256, 512], "batches": [1, 4], "layers": 1, "hidden": 1024,
            "budget_s": 15.0, "warmup_prompts": [64, 96], "vllm": True, "compile": True,
            "longest_prompt": {"4": 4096}}


def prompts(cfg: dict[str, Any], batch: int) -> list[int]:
    """The prompt lengths measured at ``batch`` (``longest_prompt`` caps a batch size's)."""
    cap = cfg.get("longest_prompt", {}).get(str(batch))
    return [length for length in cfg["prompts"] if cap is None or length <= cap]


def model_config(cfg: dict[str, Any]):
    """DeepSeek-V3's attention shape (16 heads here), few layers, dense MLPs."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=None,
        intermediate_size=2 * cfg["hidden"], vocab_size=8192, max_position_embeddings=16384,
        first_k_dense_replace=cfg["layers"], n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, n_group=1, topk_group=1, tie_word_embeddings=False)


def _variant_needs_compile(name: str) -> bool:
    return name == "transformers static+compile"


def _variant(reference, name: str, compile: bool):
    """(model, cache kind) for one variant."""
    import gqla_compile

    if name == "transformers eager":
        return reference, "dynamic"
    if _variant_needs_compile(name):
        model = copy.deepcopy(reference)
        model.forward = torch.compile(model.forward)
        return model, "static"
    model = gqla_compile.optimize(copy.deepcopy(reference), target="cpu", path=name, compile=compile)
    return model, "static"


def _cache(model, kind: str, batch: int, length: int):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=length)


def _step(model, ids, cache, positions):
    from gqla_compile.compat import CACHE_FIELD

    mask = torch.ones(ids.shape[0], int(positions[-1]) + 1, dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions.expand(ids.shape[0], -1),
                cache_position=positions, use_cache=True, **{CACHE_FIELD: cache})
    return out.logits[:, -1].argmax(-1, keepdim=True)


def best_of(run: Callable[[Any], object], setup: Callable[[], Any] = lambda: None) -> float:
    """Seconds of the fastest of up to 3 calls ``run(setup())`` (``setup`` untimed), a second and third only
    while the calls so far took under SHORT_S in all."""
    runs: list[float] = []
    while not runs or (len(runs) < 3 and sum(runs) < SHORT_S):
        state = setup()
        start = time.perf_counter()
        run(state)
        runs.append(time.perf_counter() - start)
    return min(runs)


def _prompt(batch: int, length: int, vocab: int) -> torch.Tensor:
    """The prompt every variant and vLLM get for (batch, length)."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(length))


def run_request(model, kind: str, prompt: torch.Tensor, answer: int, budget_s: float) -> dict[str, Any]:
    """One request: prefill (time to first token, :func:`best_of` into fresh caches, as the vLLM part
    measures), then greedy decode steps while the budget lasts."""
    batch, length = prompt.shape
    with torch.no_grad():
        last = {}

        def prefill(cache):
            last["cache"], last["token"] = cache, _step(model, prompt, cache, torch.arange(length))

        ttft = best_of(prefill, lambda: _cache(model, kind, batch, length + answer))
        cache, token = last["cache"], last["token"]
        tokens, steps = [token], []
        deadline = time.perf_counter() + budget_s
        for position in range(length, length + answer - 1):
            if time.perf_counter() > deadline:
                break
            start = time.perf_counter()
            token = _step(model, token, cache, torch.tensor([position]))
            steps.append(time.perf_counter() - start)
            tokens.append(token)
    return {"ttft_s": ttft, "step_s": steps, "tokens": torch.cat(tokens, 1)}


def _figures(request: dict[str, Any], answer: int, batch: int) -> dict[str, Any]:
    """Time to first token, decode tokens/s and total time for an answer of ``answer`` tokens."""
    needed = answer - 1
    measured = request["step_s"][:needed]
    extrapolated = needed - len(measured)
    decode = sum(measured) + extrapolated * (measured[-1] if measured else request["ttft_s"])
    return {"ttft_s": request["ttft_s"], "decode_tokens_per_s": batch * needed / decode if decode else None,
            "total_s": request["ttft_s"] + decode, "measured_steps": len(measured),
            "extrapolated_steps": extrapolated}


#: Inductor's CPU code for a float32 sum specialises on whether it reduces more than this many elements
#: (``need_use_acc_helper``), so a graph compiled on shorter sequences does not serve longer ones.
INDUCTOR_REDUCTION_CHUNK = 4096


def warm_up_shapes(cfg: dict[str, Any], batch: int) -> list[tuple[int, int]]:
    """(prompt, answer) of the warm-up requests: two short prompts of different lengths (dynamo compiles the
    second with dynamic shapes) and, for each other regime of the measured requests (prompt, and cache length,
    above or below INDUCTOR_REDUCTION_CHUNK), one request of that regime whose prompt is 8 tokens shorter than
    the shortest measured one there: every graph the timed requests need is compiled before them."""
    shapes = [(length, 3) for length in cfg["warmup_prompts"]]
    longest = max(cfg["answers"])

    def regime(prompt: int, answer: int) -> tuple[bool, bool]:
        return prompt > INDUCTOR_REDUCTION_CHUNK, prompt + answer > INDUCTOR_REDUCTION_CHUNK

    covered = {regime(*shape) for shape in shapes}
    for length in prompts(cfg, batch):
        prompt = max(length - 8, 1)
        if regime(prompt, longest) != regime(length, longest):
            prompt = length + 8
        if regime(prompt, longest) not in covered:
            covered.add(regime(prompt, longest))
            shapes.append((prompt, 3 if regime(prompt, 3) == regime(prompt, longest) else longest))
    return shapes


def _warm_up(model, kind: str, cfg: dict[str, Any], batch: int, vocab: int) -> None:
    for length, answer in warm_up_shapes(cfg, batch):  # the cache's length sets the regime: few steps suffice
        prompt = torch.randint(0, vocab, (batch, length))
        run_request(model, kind, prompt, answer, budget_s=min(cfg["budget_s"], 3.0))


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure_variant(model, kind: str, cfg: dict[str, Any], *, compiled: bool, name: str,
                    log=print) -> tuple[dict[str, Any], dict[str, list]]:
    """One variant's requests: (its entry of the results, its greedy tokens per "batch/prompt")."""
    vocab = model.config.vocab_size
    longest = max(cfg["answers"])
    entry: dict[str, Any] = {"cache": kind, "points": []}
    tokens: dict[str, list] = {}
    for batch in cfg["batches"]:
        if compiled:
            _warm_up(model, kind, cfg, batch, vocab)
        before = _unique_graphs()
        for length in prompts(cfg, batch):
            prompt = _prompt(batch, length, vocab)
            log(f"[request] {name}: batch {batch}, prompt {length}")
            request = run_request(model, kind, prompt, longest, cfg["budget_s"])
            tokens[f"{batch}/{length}"] = request["tokens"].tolist()
            entry["points"].append({"batch": batch, "prompt": length, **{
                f"answer_{answer}": _figures(request, answer, batch) for answer in cfg["answers"]}})
        if compiled:
            entry.setdefault("graphs_compiled_during_requests", {})[str(batch)] = _unique_graphs() - before
    return entry, tokens


def _measure_in_process(folder: str, name: str, cfg: dict[str, Any], compile: bool) -> dict[str, Any]:
    """The child's side of :func:`measure_variants`: the checkpoint in ``folder``, one variant's requests."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, kind = _variant(reference, name, compile)
    entry, tokens = measure_variant(model, kind, cfg, compiled=name != "transformers eager" and compile, name=name,
                                    log=lambda text: print(text, file=sys.stderr, flush=True))
    return {"entry": entry, "tokens": tokens}


def _run_child(spec: dict[str, Any], log, *, python: str = sys.executable, env: dict[str, str] | None = None):
    """Runs ``python -m benchmarks.request --child-spec SPEC`` (one variant's requests, or vLLM's), handing its
    progress lines to ``log``; its RESULT line, parsed."""
    command = [python, "-m", "benchmarks.request", "--child-spec", json.dumps(spec)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[1]) as child:
        stdout = []
        reader = threading.Thread(target=lambda: stdout.extend(child.stdout), daemon=True)
        reader.start()
        stderr = collections.deque(maxlen=40)
        for line in child.stderr:
            stderr.append(line)
            if line.startswith("[request]"):
                log(line.rstrip())
        reader.join()
    results = [line for line in stdout if line.startswith("RESULT ")]
    if child.returncode or not results:
        raise RuntimeError(f"the {spec['name']!r} process failed (exit {child.returncode}); its last "
                           "lines:\n" + "".join(stderr))
    return json.loads(results[-1][len("RESULT "):])


def measure_variants(folder: str, cfg: dict[str, Any], *, compile: bool, log=print) -> dict[str, Any]:
    """Every variant of the checkpoint in ``folder``, each in a process of its own (as vLLM's engine runs in its
    own): what one variant leaves in a process (its compiled graphs, the allocator's state after 8k-token
    batches) does not reach the next."""
    results: dict[str, Any] = {}
    tokens: dict[tuple, torch.Tensor] = {}
    for name in VARIANTS:
        if _variant_needs_compile(name) and not compile:
            results[name] = {"skipped": "compile is off (--no-compile)"}
            continue
        log(f"[request] {name}: own process")
        spec = {"folder": folder, "name": name, "settings": cfg, "compile": compile,
                "threads": torch.get_num_threads()}
        measured = _run_child(spec, log)
        results[name] = measured["entry"]
        for key, value in measured["tokens"].items():
            batch, length = map(int, key.split("/"))
            tokens[(name, batch, length)] = torch.tensor(value)
    return {"results": results, "identical_tokens": _identical(tokens)}


def _identical(tokens: dict[tuple, torch.Tensor]) -> dict[str, bool]:
    """Whether each variant's greedy tokens equal the unmodified eager model's, over the steps both decoded."""
    out = {}
    for (name, batch, length), got in tokens.items():
        want = tokens.get(("transformers eager", batch, length))
        if want is None or name == "transformers eager":
            continue
        n = min(want.shape[1], got.shape[1])
        out[f"{name}/b{batch}/p{length}"] = bool(torch.equal(want[:, :n], got[:, :n]))
    return out


def causal_flops(form, length: int) -> float:
    """A form's FLOPs on a causal prefill of ``length`` tokens into an empty cache: the (query, key) pairs a
    causal kernel must score, length (length + 1) / 2, plus the per-token terms (the expansion, the absorption)."""
    return form.per_pair * length * (length + 1) / 2 + (form.per_query + form.per_key) * length


def attention_roofline(reference, cfg: dict[str, Any]) -> dict[str, Any]:
    """The attention core of one layer on the longest prompt (batch 1, a prefill into an empty cache), in each
    compute form, against the form's causal FLOPs at the best matmul rate measured here (``targets.matmul_rates``); the
    cost model's figure for the CPU target is recorded beside it."""
    import gqla_compile
    from gqla_compile import targets
    from gqla_compile.paths import FormChoice

    model = gqla_compile.optimize(copy.deepcopy(reference), target="cpu", path="absorbed", compile=False)
    core = next(m.gqla_runtime.core for m in model.modules() if hasattr(m, "gqla_runtime"))
    dims = model.gqla_optimization.layers[0].dims
    length = max(cfg["prompts"])
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, dims.n_h, length, dims.d_n + dims.d_R, generator=generator)
    key = torch.randn(1, 1, length, dims.d_c + dims.d_R, generator=generator)
    rates = targets.matmul_rates(torch.float32, n=2048, budget_s=1.0)  # one 2048^3 GEMM per library
    rate = max(rates.values())
    choice = core.forms
    out = {"prompt": length, "matmul_rate_flops": rate, "matmul_rates_flops": rates, "target_cpu_peak_flops": targets.resolve("cpu").peak("float32"),
           "forms": {}}
    for form in choice.forms:
        core.forms = FormChoice((form,))
        with torch.no_grad():
            timing = common.time_call(lambda: core(query, key, key[..., :0], None), warmup=1, min_repeats=2,
                                      max_repeats=3, budget_s=0.0)
        flops = causal_flops(form, length)
        out["forms"][form.name] = {"seconds": timing.median, "flops": flops, "roofline_s": flops / rate,
                                   "over_roofline": timing.median / (flops / rate)}
    core.forms = choice
    expanded = out["forms"]["expanded"]
    out["expanded_over_expanded_roofline"] = expanded["seconds"] / expanded["roofline_s"]
    out["chosen_form"] = choice.choose(length, length).name
    return out


def _measure_vllm_in_process(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The vLLM child's side of :func:`measure_vllm`: per (batch, prompt), a 1-token request's seconds (the time
    to first token) and each answer's request's."""
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = spec["settings"]
    vocab = AutoConfig.from_pretrained(spec["folder"]).vocab_size
    llm = LLM(model=spec["folder"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=max(cfg["prompts"]) + max(cfg["answers"]) + 8, max_num_seqs=max(cfg["batches"]),
              enable_prefix_caching=False)

    def params(answer: int):
        return SamplingParams(max_tokens=answer, min_tokens=answer, ignore_eos=True, temperature=0.0)

    llm.generate([TokensPrompt(prompt_token_ids=list(range(1, 33)))], params(4), use_tqdm=False)  # warm-up
    points = []
    for batch in cfg["batches"]:
        for length in prompts(cfg, batch):
            print(f"[request] vLLM: batch {batch}, prompt {length}", file=sys.stderr, flush=True)
            requests = [TokensPrompt(prompt_token_ids=row) for row in _prompt(batch, length, vocab).tolist()]
            seconds = {}
            for answer in (1, *cfg["answers"]):
                sampling = params(answer)
                seconds[answer] = best_of(lambda _: llm.generate(requests, sampling, use_tqdm=False))
            points.append({"batch": batch, "prompt": length, "ttft_s": seconds[1],
                           "total_s": {str(answer): seconds[answer] for answer in cfg["answers"]}})
    return points


def measure_vllm(folder: str, cfg: dict[str, Any], python: str, log=print) -> dict[str, Any]:
    """vLLM's CPU build in a subprocess, on the DeepSeek-V3 checkpoint in ``folder`` (prefix caching off,
    one warm-up request): time to first token as a 1-token request, each answer as a request of the same prompts
    (best of up to 3 where requests take under SHORT_S: the difference of two short single runs is mostly noise
    on a shared machine)."""
    if not Path(python).is_file():
        return {"skipped": f"{python} not found (vLLM's CPU build is not installed)"}
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "OMP_NUM_THREADS": str(torch.get_num_threads()), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    try:
        measured = _run_child({"folder": folder, "name": "vllm", "settings": cfg}, log, python=python, env=env)
    except RuntimeError as error:
        return {"error": str(error)}
    points = []
    for point in measured:
        entry = {"batch": point["batch"], "prompt": point["prompt"]}
        for answer in cfg["answers"]:
            total = point["total_s"][str(answer)]
            decode = total - point["ttft_s"]  # the request's time less a 1-token request's
            entry[f"answer_{answer}"] = {"ttft_s": point["ttft_s"], "total_s": total,
                                         "decode_tokens_per_s": point["batch"] * (answer - 1) / decode if decode > 0
                                         else None, "measured_steps": answer - 1, "extrapolated_steps": 0}
        points.append(entry)
    return {"cache": "vLLM paged (MLA backend)", "points": points}


def run(out: str, *, quick: bool = False, compile: bool | None = None, vllm: bool | None = None,
        vllm_python: str | None = None, batches: list[int] | None = None, log=print, **_: Any) -> dict[str, Any]:
    """``compile`` / ``vllm``: None takes the mode's default (quick mode: neither, so that it runs in about a
    minute; Inductor's compiles alone take minutes here). ``batches``: a part of the mode's batch sizes (the
    full grid's batch 4 at 8k needs more memory than 24 GiB for transformers' eager attention scores)."""
    cfg = settings(quick)
    if batches:
        cfg["batches"] = list(batches)
    compile = cfg["compile"] if compile is None else compile
    machine = common.machine_info()
    reference = common.build_model(model_config(cfg))
    payload: dict[str, Any] = {"part": PART, "quick": quick, "settings": cfg, "machine": machine,
                               "parameters": common.parameter_count(reference), "dtype": "float32",
                               "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as folder:  # the weights every process loads
        reference.save_pretrained(folder, safe_serialization=True)
        payload.update(measure_variants(folder, cfg, compile=compile, log=log))
        if cfg["vllm"] if vllm is None else vllm:
            python, why_not = common.vllm_python(vllm_python)
            if python is None:
                payload["vllm_skipped"] = why_not
            else:
                log("[request] vLLM")
                payload["results"]["vllm"] = measure_vllm(folder, cfg, python, log)
    payload["attention_roofline"] = attention_roofline(reference, cfg)
    payload["load_average_after"] = common.load_average()
    common.write_json(out, PART, payload)
    (Path(out) / f"{PART}.md").write_text(summary(payload) + "\n")
    return payload


def summary(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    lines = ["## Whole requests (issue 24)", "",
             f"DeepSeek-V3-shaped model ({payload['parameters'] / 1e6:.0f}M parameters: {s['layers']} layers, hidden "
             f"{s['hidden']}, 16 heads, d_c 512, d_R 64, d_n 128, d_v 128), float32, {payload['threads']} thread(s). "
             "TTFT: the prefill call; decode tokens/s: the batch's tokens over the decode steps; total: both. "
             "Steps past a variant's time budget are counted at its last step time (`extrapolated` column).", ""]
    rows = []
    for name, entry in payload["results"].items():
        if "points" not in entry:
            rows.append([name, "-", "-", "-", "-", "-", "-", entry.get("skipped") or entry.get("error")])
            continue
        for point in entry["points"]:
            for answer in s["answers"]:
                f = point[f"answer_{answer}"]
                rows.append([name, point["batch"], point["prompt"], answer, f["ttft_s"], f["decode_tokens_per_s"],
                             f["total_s"], f["extrapolated_steps"] or ""])
    lines += [common.markdown_table(["variant", "batch", "prompt", "answer", "TTFT s", "decode tokens/s", "total s",
                                     "extrapolated"], rows), ""]
    compiled = {n: e["graphs_compiled_during_requests"] for n, e in payload["results"].items()
                if "graphs_compiled_during_requests" in e}
    if compiled:
        lines += ["Graphs dynamo compiled during the timed requests (after the warm-up), per batch size: "
                  + "; ".join(f"{n}: {v}" for n, v in compiled.items()), ""]
    same = payload.get("identical_tokens") or {}
    lines += [f"Greedy tokens identical to transformers eager over the steps both decoded: "
              f"{sum(same.values())} of {len(same)} requests.", ""]
    r = payload["attention_roofline"]
    rows = [[form, f["seconds"], f["flops"] / 1e9, f["roofline_s"], f["over_roofline"]] for form, f in r["forms"].items()]
    lines += [f"Attention of one layer on a {r['prompt']}-token prefill (batch 1), each compute form, against its FLOPs "
              f"at the best matmul rate measured in this run ({r['matmul_rate_flops'] / 1e9:.0f} GFLOP/s, one "
              f"2048^3 float32 GEMM: {_rates_text(r)}; the cost model's CPU target says "
              f"{r['target_cpu_peak_flops'] / 1e9:.0f}); the "
              f"plan runs **{r['chosen_form']}**, {r['expanded_over_expanded_roofline']:.2f}x the expanded form's "
              "FLOP time. FLOPs of a causal prefill: the T (T + 1) / 2 pairs a causal kernel scores, the expansion "
              "and the absorption per token.", "",
              common.markdown_table(["form", "seconds", "GFLOP", "roofline s", "x roofline"], rows), ""]
    return "\n".join(lines)


def _rates_text(roofline: dict[str, Any]) -> str:
    return ", ".join(f"{name} {rate / 1e9:.0f}" for name, rate in roofline["matmul_rates_flops"].items())


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.request", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--no-vllm", action="store_true", help="leave vLLM out (quick mode leaves it out anyway)")
    parser.add_argument("--vllm", action="store_true", help="run vLLM in quick mode too")
    parser.add_argument("--compile", action="store_true", help="compile in quick mode too")
    parser.add_argument("--vllm-python", default=None, help="the Python of vLLM's environment")
    parser.add_argument("--batches", type=lambda text: [int(b) for b in text.split(",")], default=None,
                        help="batch sizes to run instead of the mode's (comma-separated)")
    parser.add_argument("--child-spec", default=None, help=argparse.SUPPRESS)  # a process _run_child started
    args = parser.parse_args(argv)
    if args.child_spec:
        spec = json.loads(args.child_spec)
        if spec["name"] == "vllm":
            measured = _measure_vllm_in_process(spec)
        else:
            common.apply_threads(spec["threads"])
            measured = _measure_in_process(spec["folder"], spec["name"], spec["settings"], spec["compile"])
        print("RESULT " + json.dumps(measured))
        return 0
    common.apply_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    vllm = False if args.no_vllm else (True if args.vllm else None)
    compile = False if args.no_compile else (True if args.compile else None)
    print(summary(run(args.out, quick=args.quick, compile=compile, vllm=vllm, vllm_python=args.vllm_python,
                      batches=args.batches)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
