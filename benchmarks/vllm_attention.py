"""Decode-attention cost of vLLM's attention backends on this platform, the table the GQLA plugin's load-time
path choice prices vLLM's kernels with (``gqla_compile.serving.backend_costs``).

    <vLLM python> -m benchmarks.vllm_attention            # gqla_compile/serving/backend_attention.json and
                                                          # benchmarks/results/vllm_attention.md
    <vLLM python> -m benchmarks.vllm_attention --out DIR  # both into DIR instead

Why: the cost model's measured CPU target carries the efficiency of the attention kernels of this project's
torch runtime; inside vLLM the attention core is vLLM's kernel instead (on CPU: ``CPU_MLA``'s
``mla_decode_kvcache`` for the absorbed path, ``CPU_ATTN``'s ``cpu_attention_with_kv_cache`` for the grouped
path), and those run at other speeds. This times each backend's decode kernel, as vLLM's backend calls it
(its cache layout and block size, float32, one OpenMP thread pinned by the caller), over a paged cache of
``--context`` tokens for ``--batch`` sequences, at several query rows per cached head (absorbed: the query
heads sharing the one latent head; grouped: query heads per KV head). Each point records the bytes the
kernel must read (the cache), the FLOPs it must do (scores and values) and the median seconds; the plugin
turns them into efficiencies against whatever target it plans on (roofline time / measured time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "gqla_compile" / "serving"
MLA_LATENT, MLA_ROPE, MLA_BLOCK = 512, 64, 16  # vLLM-CPU's MLA kernel: 576-dim latent heads, 16-token blocks
ABSORBED_ROWS = (4, 16, 64, 128)  # query heads per (latent) cached head
GROUPED_ROWS = (1, 2, 4, 8, 16)  # query heads per KV head
GROUPED_KV_HEADS, GROUPED_HEAD, GROUPED_BLOCK = 4, 192, 128  # the serving benchmark's grouped layer


def _paged(batch: int, context: int, block: int) -> tuple[Any, Any, int]:
    """Block table (each sequence its own consecutive blocks), sequence lengths, number of blocks."""
    import torch

    per_seq = -(-context // block)
    table = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    return table, torch.full((batch,), context, dtype=torch.int32), batch * per_seq


def absorbed_points(batch: int, context: int, repeats: int) -> list[dict[str, float]]:
    """CPU_MLA's decode kernel: one new token per sequence, ``rows`` query heads over one 576-dim latent head."""
    import torch
    from gqla_compile.targets import median_seconds
    from vllm import _custom_ops as ops

    table, lens, blocks = _paged(batch, context, MLA_BLOCK)
    head = MLA_LATENT + MLA_ROPE
    cache = torch.randn(blocks, MLA_BLOCK, head)
    points = []
    for rows in ABSORBED_ROWS:
        q = torch.randn(batch, rows, head)
        out = torch.zeros(batch, rows, MLA_LATENT)
        seconds = median_seconds(lambda: ops.mla_decode_kvcache_cpu(out, q, cache, head**-0.5, table, lens), 0.0, repeats)
        points.append({"rows": rows, "bytes": batch * context * head * 4,
                       "flops": 2 * batch * context * rows * (head + MLA_LATENT), "seconds": seconds})
    return points


def grouped_points(batch: int, context: int, repeats: int) -> list[dict[str, float]]:
    """CPU_ATTN's kernel on decode: one new token per sequence, ``rows`` query heads per KV head."""
    import torch
    from gqla_compile.targets import median_seconds
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    table, lens, blocks = _paged(batch, context, GROUPED_BLOCK)
    kv_heads, head = GROUPED_KV_HEADS, GROUPED_HEAD
    cache = torch.randn(blocks, kv_heads, GROUPED_BLOCK * 2, head)  # vLLM's view: keys then values per block
    keys, values = cache.chunk(2, dim=2)
    isa = _get_attn_isa(torch.float32, GROUPED_BLOCK, head)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    points = []
    for rows in GROUPED_ROWS:
        heads = kv_heads * rows
        q = torch.randn(batch, heads, head)
        out = torch.empty_like(q)
        meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=batch, num_heads=heads, num_kv_heads=kv_heads,
                                                   head_dim=head, seq_lens=lens, dtype=torch.float32,
                                                   query_start_loc=starts, causal=True, sliding_window_size=-1,
                                                   isa=isa, enable_kv_split=False)

        def run() -> None:
            ops.cpu_attention_with_kv_cache(query=q, key_cache=keys, value_cache=values, output=out,
                                            query_start_loc=starts, seq_lens=lens, scale=head**-0.5, causal=True,
                                            alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
                                            scheduler_metadata=meta, s_aux=None)

        seconds = median_seconds(run, 0.0, repeats)
        points.append({"rows": rows, "bytes": batch * context * kv_heads * 2 * head * 4,
                       "flops": 2 * batch * context * heads * 2 * head, "seconds": seconds})
    return points


def measure(batch: int, context: int, repeats: int) -> dict[str, Any]:
    """The table for this platform: per backend name, its points, with the provenance of the run."""
    import torch
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise SystemExit(f"only vLLM's CPU backends are measured by this script; this platform is "
                         f"{current_platform.device_name!r}")
    backends = {"CPU_MLA": absorbed_points(batch, context, repeats),
                "CPU_ATTN": grouped_points(batch, context, repeats)}
    return {"platform": "cpu", "backends": backends,
            "provenance": {"command": "python -m benchmarks.vllm_attention", "vllm": vllm.__version__,
                           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                           "torch_threads": torch.get_num_threads(), "dtype": "float32", "batch": batch,
                           "context": context,
                           "repeats": repeats, "load_average": list(os.getloadavg()),
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}


def markdown(table: dict[str, Any]) -> str:
    p = table["provenance"]
    lines = ["## vLLM attention backends, decode kernel cost (gqla_compile/serving/backend_attention.json)", "",
             f"vLLM {p['vllm']}, torch {p['torch']}, {p['torch_threads']} thread(s), batch {p['batch']}, context "
             f"{p['context']}, float32, median of {p['repeats']}, load average {p['load_average']}, {p['date']}.", "",
             "| backend | rows per cached head | MB read | GFLOP | ms | GB/s | GFLOP/s |", "|---|---|---|---|---|---|---|"]
    for name, points in table["backends"].items():
        for q in points:
            lines.append(f"| {name} | {q['rows']} | {q['bytes'] / 1e6:.1f} | {q['flops'] / 1e9:.2f} | "
                         f"{q['seconds'] * 1e3:.2f} | {q['bytes'] / q['seconds'] / 1e9:.1f} | "
                         f"{q['flops'] / q['seconds'] / 1e9:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for backend_attention.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pin the process to as many cores)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    table = measure(args.batch, args.context, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out, delete=False, suffix=".tmp") as f:
        json.dump(table, f, indent=1)
    os.replace(f.name, args.out / "backend_attention.json")
    results = ROOT / "benchmarks" / "results" if args.out == DEFAULT_OUT else args.out
    (results / "vllm_attention.md").write_text(markdown(table))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
