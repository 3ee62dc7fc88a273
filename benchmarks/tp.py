"""Tensor-parallel decoding on this CPU (gloo): per-rank cache bytes and decode step time for P = 1, 2, 4,
both paths, eager (compile=False).

    python -m benchmarks.tp                    # writes benchmarks/results/tp.json and tp.md
    python -m benchmarks.tp --tp 1 2 --steps 16

Each P runs in its own set of processes (``gqla_compile.distributed.run_parallel``, one thread per rank):
the same random GQLA model on every rank, optimized with tp=P, a prefill of ``context`` tokens, then
``steps`` single-token decode steps. A step's time is the slowest rank's (the ranks meet in every
layer's all-reduce); the table shows the median step. On a machine with fewer cores than P the ranks
share cores, so step times there say more about the all-reduce and oversubscription than about the
arithmetic; the cache bytes are exact.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gqla_compile.paths import PATH_NAMES as PATHS

RESULTS = Path(__file__).resolve().parent / "results"
# A GQLA shape big enough for the attention to matter, small enough for a 2-core CPU.
MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
             vocab_size=1024)


def _rank(rank: int, world_size: int, paths, context: int, steps: int) -> dict:
    import gqla_compile
    from transformers import AutoModelForCausalLM, DynamicCache

    from gqla_compile.tiny import tiny_gqla

    out = {}
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny_gqla(**MODEL)).eval()
    for path in paths:
        model = gqla_compile.optimize(copy.deepcopy(reference), target="cpu", path=path,
                                      tp=world_size if world_size > 1 else None, compile=False)
        tokens = torch.randint(0, MODEL["vocab_size"], (1, context + steps), generator=torch.Generator().manual_seed(1))
        cache = DynamicCache()
        times = []
        with torch.no_grad():
            model(tokens[:, :context], cache=cache, use_cache=True)
            for i in range(context, context + steps):
                if world_size > 1:
                    torch.distributed.barrier()
                start = time.perf_counter()
                model(tokens[:, i : i + 1], cache=cache, use_cache=True)
                times.append(time.perf_counter() - start)
        layer = model.gqla_optimization.layers[0]
        out[path] = dict(
            cache_bytes=sum(t.numel() * t.element_size() for lyr in cache.layers for t in (lyr.keys, lyr.values)),
            cache_bytes_per_token_per_layer=layer.cache_elements_per_rank * reference.dtype.itemsize,
            whole_cache_bytes_per_token_per_layer=layer.cache_elements_after * reference.dtype.itemsize,
            step_times_s=times,
        )
    return out


def run(tps=(1, 2, 4), paths=PATHS, context: int = 512, steps: int = 32, timeout: float = 600.0) -> dict:
    from gqla_compile.distributed import run_parallel

    rows = []
    for tp in tps:
        ranks = run_parallel(_rank, tp, tuple(paths), context, steps, timeout=timeout, backend="gloo")
        for path in paths:
            per_step = [max(r[path]["step_times_s"][i] for r in ranks) for i in range(steps)]
            rows.append(dict(
                tp=tp, path=path,
                cache_bytes_per_rank=[r[path]["cache_bytes"] for r in ranks],
                cache_bytes_per_token_per_layer_per_rank=ranks[0][path]["cache_bytes_per_token_per_layer"],
                whole_cache_bytes_per_token_per_layer=ranks[0][path]["whole_cache_bytes_per_token_per_layer"],
                decode_step_ms_median=1e3 * statistics.median(per_step),
                decode_step_ms_min=1e3 * min(per_step),
            ))
    return dict(
        benchmark="tp",
        machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), torch=torch.__version__,
                     backend="gloo", threads_per_rank=1),
        model=dict(MODEL, dtype="float32"), context=context, steps=steps, compile=False, rows=rows,
    )


def to_markdown(result: dict) -> str:
    m = result["model"]
    lines = [
        f"# Tensor-parallel decode on CPU (gloo, {result['machine']['cpu_count']} cores, 1 thread per rank)",
        "",
        f"GQLA model: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, n_h {m['num_attention_heads']}, "
        f"n_g {m['num_key_value_heads']}, d_c {m['kv_lora_rank']}, d_R {m['qk_rope_head_dim']}, "
        f"d_n {m['qk_nope_head_dim']}, d_v {m['v_head_dim']}, float32, eager. Context {result['context']} tokens, "
        f"{result['steps']} decode steps (batch 1); step time = slowest rank, median.",
        "",
        "| P | path | cache bytes / token / layer, per rank | whole layer | cache bytes per rank after decode "
        "| decode step (ms, median) | min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        per_rank = ", ".join(str(b) for b in r["cache_bytes_per_rank"])
        lines.append(f"| {r['tp']} | {r['path']} | {r['cache_bytes_per_token_per_layer_per_rank']} | "
                     f"{r['whole_cache_bytes_per_token_per_layer']} | {per_rank} | "
                     f"{r['decode_step_ms_median']:.2f} | {r['decode_step_ms_min']:.2f} |")
    lines += ["", "Grouped: each rank caches its n_g / P groups (1/P of the cache); absorbed: every rank caches "
              "the whole latent. Attention is sharded; embeddings, MLP and lm_head are replicated. With more "
              "ranks than cores the step times include oversubscription."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="tensor-parallel decode benchmark (CPU, gloo)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = run(tuple(args.tp), context=args.context, steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tp.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "tp.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
