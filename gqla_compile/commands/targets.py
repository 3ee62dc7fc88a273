"""``gqla-compile targets``: the known target chips, their figures and roofline ridge points."""

from __future__ import annotations

import argparse

from .. import targets


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "targets",
        help="list the known target chips with their figures and ridge points",
        description="List the target chips the cost model knows: dense bf16/fp32 peak, memory bandwidth and "
        "capacity, TP interconnect, and the ridge point (bf16 peak / bandwidth) that decides whether a kernel "
        "is compute- or memory-bound. Datasheet figures; the cpu row is measured on this machine.",
    )
    parser.add_argument("--measure", action="store_true", help="also measure this machine's cpu (a few seconds)")
    parser.set_defaults(func=run)


def _row(target: targets.Target) -> list[str]:
    peaks = target.peak_flops
    ridge_dtype = "bfloat16" if "bfloat16" in peaks else "float32"
    return [
        target.name,
        *(f"{peaks[d] / 1e12:.4g}" if d in peaks else "-" for d in ("bfloat16", "float32", "float8")),
        f"{target.memory_bandwidth / 1e9:.0f}",
        f"{target.memory_capacity / 1e9:.0f}",
        f"{target.interconnect_bandwidth / 1e9:.0f}",
        str(target.devices_per_node),
        f"{target.ridge(ridge_dtype):.0f}",
    ]


def run(args: argparse.Namespace) -> None:
    from tabulate import tabulate

    names = [n for n in targets.names() if args.measure or n != "cpu"]
    headers = ["target", "bf16 TFLOP/s", "fp32 TFLOP/s", "fp8 TFLOP/s", "mem GB/s", "mem GB", "link GB/s",
               "per node", "ridge FLOP/B"]
    print(tabulate([_row(targets.get(n)) for n in names], headers=headers, disable_numparse=True))
    print("dense (no sparsity) figures; link = TP interconnect per device and direction; ridge = bf16 peak "
          "/ memory bandwidth (fp32 where a chip has no bf16 figure)")
