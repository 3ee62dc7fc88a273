"""The decode and s_q measurements on a CUDA device in bfloat16, against the device's roofline.

Same functions as the CPU parts (``common.ModelPool`` / ``Measurements`` / ``DecodeTimer`` with a device and
dtype): the unmodified model (eager) and both rewritten paths compiled with Inductor, ``mode="reduce-overhead"``
(CUDA graphs; the StaticCache's buffers have static addresses) unless ``--compile-mode default``. Roofline:
the device's copy bandwidth and bf16 matmul rate measured here; the decode attention's achieved bandwidth
and FLOP/s are the attention core's bytes and FLOPs (from the cost model's accounting) over the step time
it adds, i.e. t(context) - t(16 tokens) at the same batch.

    python -m benchmarks.gpu [--quick] [--out benchmarks/results] [--compile-mode reduce-overhead]

Needs CUDA; exits with status 1 and a message saying so when there is none. Sized to finish in under 8
minutes on one H100/H200-class GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from . import common

PART = "gpu"
SMALL_CONTEXT = 16


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"shapes": ["gqla"], "contexts": [64, 128], "batches": [1, 2], "s_qs": [1, 2], "sq_batch": 2,
                "budget_s": 0.2}
    return {"shapes": list(common.SHAPES), "contexts": [2048, 8192, 32768], "batches": [1, 16, 64],
            "s_qs": [1, 2, 4, 8], "sq_batch": 16, "budget_s": 0.5}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, small contexts")
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="folder for gpu.json")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: %(default)s)")
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=("reduce-overhead", "default"),
                        help="torch.compile mode for the rewritten paths (default: %(default)s, CUDA graphs)")
    parser.add_argument("--max-cache-gb", type=float, default=40.0, help="skip points whose cache is larger")
    return parser


def roofline(device: str, dtype: torch.dtype) -> dict[str, float]:
    """Measured copy bandwidth (B/s, read + write) and dense matmul rate (FLOP/s) of the device."""
    sync = torch.cuda.synchronize
    src = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    copy_t = common.time_call(lambda: dst.copy_(src), warmup=3, min_repeats=10, budget_s=0.5, sync=sync)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_t = common.time_call(lambda: a @ b, warmup=3, min_repeats=10, budget_s=0.5, sync=sync)
    return {"copy_bandwidth": 2 * src.numel() / copy_t.median, "matmul_flops": 2 * n**3 / mm_t.median}


def attention_core(config, path: str, *, batch: int, context: int, s_q: int, dtype: str) -> tuple[float, float]:
    """(bytes, FLOPs) of the attention core over all layers, as the cost model counts them."""
    from gqla_compile.cost_model import plan
    from gqla_compile.targets import get

    p = plan(config, get("h100"), s_q=s_q, batch_size=batch, context_len=context, dtype=dtype, path=path)
    part = p.costs[path].part("attention_core")
    return part.bytes * p.num_layers, part.flops * p.num_layers


def run(out: str, *, quick: bool = False, device: str = "cuda", compile_mode: str = "reduce-overhead",
        max_cache_gb: float = 40.0) -> dict[str, Any]:
    cfg = settings(quick)
    dtype = torch.bfloat16
    mode = None if compile_mode == "default" else compile_mode
    pool = common.ModelPool(quick=quick, dtype=dtype, device=device, target="h100", compile_mode=mode)
    runs = common.Measurements(pool, budget_s=cfg["budget_s"], max_cache_bytes=max_cache_gb * 1e9)
    machine = common.machine_info(device)
    peak = roofline(device, dtype)
    variants = [("original", False), ("absorbed", True), ("grouped", True)]
    decode_rows, sq_rows = [], []
    started = time.perf_counter()
    for shape in cfg["shapes"]:
        config = pool.config(shape)
        for variant, compiled in variants:
            for batch in cfg["batches"]:
                base = runs.decode(shape, variant, compiled, batch=batch, context=SMALL_CONTEXT)["timing"]
                for context in cfg["contexts"]:
                    result = runs.decode(shape, variant, compiled, batch=batch, context=context)
                    row = {"shape": shape, "variant": variant, "compiled": compiled, "batch": batch,
                           "context": context, "cache_bytes": result["cache_bytes"], "skipped": result["skipped"]}
                    timing = result["timing"]
                    if timing:
                        row.update(step_s=timing.median, timing=timing.to_dict(), tokens_per_s=batch / timing.median)
                        if variant != "original" and base:
                            n_bytes, flops = attention_core(config, variant, batch=batch, context=context, s_q=1,
                                                            dtype="bfloat16")
                            extra = max(timing.median - base.median, 1e-9)
                            row.update(attention_s=extra, achieved_bandwidth=n_bytes / extra,
                                       achieved_flops=flops / extra,
                                       bandwidth_fraction=n_bytes / extra / peak["copy_bandwidth"],
                                       flops_fraction=flops / extra / peak["matmul_flops"])
                    decode_rows.append(row)
        for context in cfg["contexts"][:2]:
            for s_q in cfg["s_qs"]:
                row = {"shape": shape, "context": context, "s_q": s_q, "batch": cfg["sq_batch"]}
                for variant, compiled in variants:
                    timing = runs.decode(shape, variant, compiled, batch=cfg["sq_batch"], context=context,
                                         s_q=s_q)["timing"]
                    row[variant] = timing.median if timing else None
                sq_rows.append(row)
    for row in decode_rows:
        ref = next((r for r in decode_rows if r["variant"] == "original" and r["shape"] == row["shape"]
                    and r["batch"] == row["batch"] and r["context"] == row["context"]), None)
        if ref and ref.get("step_s") and row.get("step_s"):
            row["speedup_vs_unmodified"] = ref["step_s"] / row["step_s"]
    payload = {"part": PART, "quick": quick, "settings": cfg, "dtype": str(dtype), "compile_mode": compile_mode,
               "machine": machine, "roofline": peak, "seconds": time.perf_counter() - started,
               "decode": decode_rows, "sq": sq_rows}
    common.write_json(out, PART, payload)
    return payload


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu: CUDA is not available on this machine (torch "
              f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); nothing measured. "
              "Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 1
    payload = run(args.out, quick=args.quick, device=args.device, compile_mode=args.compile_mode,
                  max_cache_gb=args.max_cache_gb)
    print(f"benchmarks.gpu: wrote {args.out}/gpu.json in {payload['seconds']:.0f} s; roofline "
          f"{payload['roofline']['copy_bandwidth'] / 1e9:.0f} GB/s, {payload['roofline']['matmul_flops'] / 1e12:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
