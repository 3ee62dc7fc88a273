"""Target chips for the cost model: peak dense matmul FLOP/s per dtype, memory bandwidth and capacity,
and the interconnect that tensor parallelism all-reduces over.

The built-in figures are vendor datasheet figures (dense, i.e. without 2:4 sparsity) so that the roofline
ridge (peak / bandwidth) is the one the paper reasons with. The ``cpu`` target is measured on this machine
instead (``measure_cpu``): a datasheet says little about what torch achieves on a shared 2-core box.

Conventions for the built-ins:
- ``float32`` is the plain FP32 (CUDA-core / vector) figure: torch's default float32 matmul does not use
  TF32 (``torch.backends.cuda.matmul.allow_tf32`` is False by default).
- ``float8`` is the dense FP8 (e4m3) tensor-core figure; chips without FP8 simply lack the key.
- ``interconnect_bandwidth`` is per device and per direction: half the datasheet's bidirectional NVLink /
  Infinity Fabric / PCIe figure, which is what a ring all-reduce's bus bandwidth is bounded by.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .errors import UnknownTargetError

logger = logging.getLogger(__name__)

# dtype name -> bytes per element; also the dtypes a Target's peak_flops may name.
DTYPE_BYTES: dict[str, int] = {"float8": 1, "bfloat16": 2, "float16": 2, "float32": 4}

# The CPU "interconnect": TP ranks on one host all-reduce through shared memory, copying each byte into a
# shared buffer and back out again, so the link runs at about half the measured copy bandwidth.
CPU_INTERCONNECT_FACTOR = 2.0

_T = 1e12  # tera
_G = 1e9  # giga
_GB = 10**9  # datasheets quote decimal gigabytes


@dataclass(frozen=True)
class Target:
    """One chip as the roofline sees it. All figures are per device."""

    name: str
    peak_flops: Mapping[str, float] = field(hash=False)  # dtype name -> dense matmul FLOP/s
    memory_bandwidth: float  # B/s
    memory_capacity: float  # bytes
    interconnect_bandwidth: float  # B/s per device and direction, for the TP all-reduce
    devices_per_node: int = 8

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Target.name must be a non-empty string")
        if not self.peak_flops:
            raise ValueError(f"Target {self.name!r}: peak_flops must name at least one dtype")
        for dtype, flops in self.peak_flops.items():
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"Target {self.name!r}: peak_flops has unknown dtype {dtype!r}; "
                                 f"known: {', '.join(DTYPE_BYTES)}")
            _check_positive(self.name, f"peak_flops[{dtype!r}]", flops)
        for name in ("memory_bandwidth", "memory_capacity", "interconnect_bandwidth", "devices_per_node"):
            _check_positive(self.name, name, getattr(self, name))
        object.__setattr__(self, "name", self.name.lower())
        object.__setattr__(self, "peak_flops", dict(self.peak_flops))  # a private copy nobody mutates

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for a dtype; a dtype the chip has no figure for falls back to the nearest one."""
        dtype = dtype_name(dtype)
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        nearest = min(self.peak_flops, key=lambda d: (abs(DTYPE_BYTES[d] - DTYPE_BYTES[dtype]), -DTYPE_BYTES[d]))
        logger.warning("target %s has no %s figure; using its %s peak instead", self.name, dtype, nearest)
        return self.peak_flops[nearest]

    def ridge(self, dtype: str = "bfloat16") -> float:
        """Roofline ridge point in FLOP/B: above it a kernel is compute-bound, below it memory-bound."""
        return self.peak(dtype) / self.memory_bandwidth


def _check_positive(target: str, field_name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"Target {target!r}: {field_name} must be a positive number, got {value!r}")


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical dtype name ("bfloat16", "float32", ...) for a torch.dtype or a string like "bf16"."""
    text = str(dtype).removeprefix("torch.").lower()
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
               "fp8": "float8"}
    text = aliases.get(text, text)
    if text.startswith("float8"):  # float8_e4m3fn, float8_e5m2, ...
        text = "float8"
    if text not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return text


BUILTINS: tuple[Target, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5), https://www.nvidia.com/en-us/data-center/h100/ :
    # FP8 3,958 / BF16 1,979 / FP16 1,979 TFLOPS with sparsity (half dense), FP32 67 TFLOPS,
    # 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s.
    Target("h100", {"float8": 1979 * _T, "bfloat16": 989.4 * _T, "float16": 989.4 * _T, "float32": 66.9 * _T},
           memory_bandwidth=3.35e12, memory_capacity=80 * _GB, interconnect_bandwidth=450 * _G),
    # NVIDIA H800 SXM5 datasheet (nvidia.cn, "NVIDIA H800 Tensor Core GPU"): H100 SXM compute and memory,
    # NVLink cut to 400 GB/s.
    Target("h800", {"float8": 1979 * _T, "bfloat16": 989.4 * _T, "float16": 989.4 * _T, "float32": 66.9 * _T},
           memory_bandwidth=3.35e12, memory_capacity=80 * _GB, interconnect_bandwidth=200 * _G),
    # NVIDIA HGX H20 product brief (2023; figures as widely reported, e.g. SemiAnalysis): FP8 296,
    # BF16/FP16 148 TFLOPS dense, FP32 44 TFLOPS, 96 GB HBM3 at 4.0 TB/s, NVLink 900 GB/s.
    Target("h20", {"float8": 296 * _T, "bfloat16": 148 * _T, "float16": 148 * _T, "float32": 44 * _T},
           memory_bandwidth=4.0e12, memory_capacity=96 * _GB, interconnect_bandwidth=450 * _G),
    # NVIDIA H200 datasheet (SXM), https://www.nvidia.com/en-us/data-center/h200/ : H100 SXM compute,
    # 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    Target("h200", {"float8": 1979 * _T, "bfloat16": 989.4 * _T, "float16": 989.4 * _T, "float32": 66.9 * _T},
           memory_bandwidth=4.8e12, memory_capacity=141 * _GB, interconnect_bandwidth=450 * _G),
    # NVIDIA A100 Tensor Core GPU datasheet (80 GB SXM), https://www.nvidia.com/en-us/data-center/a100/ :
    # BF16/FP16 312 TFLOPS dense, FP32 19.5 TFLOPS, no FP8, 2,039 GB/s HBM2e, NVLink 600 GB/s.
    Target("a100", {"bfloat16": 312 * _T, "float16": 312 * _T, "float32": 19.5 * _T},
           memory_bandwidth=2.039e12, memory_capacity=80 * _GB, interconnect_bandwidth=300 * _G),
    # NVIDIA L40S datasheet, https://www.nvidia.com/en-us/data-center/l40s/ : FP8 733 / BF16 362.05 /
    # FP16 362.05 TFLOPS dense (twice that with sparsity), FP32 91.6 TFLOPS, 48 GB GDDR6 at 864 GB/s,
    # no NVLink: PCIe Gen4 x16, 64 GB/s bidirectional.
    Target("l40s", {"float8": 733 * _T, "bfloat16": 362.05 * _T, "float16": 362.05 * _T, "float32": 91.6 * _T},
           memory_bandwidth=864 * _G, memory_capacity=48 * _GB, interconnect_bandwidth=32 * _G),
    # NVIDIA HGX B200 specifications, https://www.nvidia.com/en-us/data-center/hgx/ (8 GPUs: FP8 72 PFLOPS,
    # FP16/BF16 36 PFLOPS, both with sparsity; FP32 600 TFLOPS) and DGX B200 datasheet (1,440 GB HBM3e at
    # 64 TB/s for 8 GPUs); NVLink 5 1.8 TB/s per GPU.
    Target("b200", {"float8": 4500 * _T, "bfloat16": 2250 * _T, "float16": 2250 * _T, "float32": 75 * _T},
           memory_bandwidth=8.0e12, memory_capacity=180 * _GB, interconnect_bandwidth=900 * _G),
    # AMD Instinct MI300X data sheet, https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html :
    # FP8 2,614.9 / BF16 1,307.4 / FP16 1,307.4 TFLOPS dense, FP32 matrix 163.4 TFLOPS, 192 GB HBM3 at
    # 5.3 TB/s, Infinity Fabric 896 GB/s peak aggregate (7 links).
    Target("mi300x", {"float8": 2614.9 * _T, "bfloat16": 1307.4 * _T, "float16": 1307.4 * _T,
                      "float32": 163.4 * _T},
           memory_bandwidth=5.3e12, memory_capacity=192 * _GB, interconnect_bandwidth=448 * _G),
)

_REGISTRY: dict[str, Target] = {t.name: t for t in BUILTINS}


def names() -> list[str]:
    """Known target names, built-ins first, then ``cpu``, then registered custom chips."""
    return [*_REGISTRY, *(n for n in _LAZY if n not in _REGISTRY)]


def get(name: str | Target) -> Target:
    """The Target of that name (case-insensitive); a Target passes through unchanged."""
    if isinstance(name, Target):
        return name
    key = str(name).lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _LAZY:
        return _LAZY[key]()
    raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(names())} "
                             "(or 'auto'; register a custom chip with gqla_compile.targets.register(Target(...)))")


def register(target: Target, *, replace: bool = False) -> Target:
    """Add a custom chip to the registry so that it can be named like a built-in."""
    if not isinstance(target, Target):
        raise TypeError(f"register() takes a Target, got {type(target).__name__}")
    if target.name in names() and not replace:
        raise ValueError(f"target {target.name!r} is already registered; pass replace=True to overwrite it")
    _REGISTRY[target.name] = target
    return target


def resolve(name: str | Target = "auto") -> Target:
    """Like ``get``, plus "auto": the current CUDA/ROCm device by name, or the measured CPU without one."""
    if isinstance(name, Target) or str(name).lower() != "auto":
        return get(name)
    if not torch.cuda.is_available():
        return get("cpu")
    return target_for_device_name(torch.cuda.get_device_name())


def target_for_device_name(device_name: str) -> Target:
    """Match a device name such as "NVIDIA H100 80GB HBM3" or "AMD Instinct MI300X" to a known target."""
    for name in sorted(_REGISTRY, key=len, reverse=True):  # longest first, and \b keeps H20 from matching H200
        if re.search(rf"\b{re.escape(name)}\b", device_name, flags=re.IGNORECASE):
            logger.info("device %r planned as target %s", device_name, name)
            return _REGISTRY[name]
    raise UnknownTargetError(f"no known target matches device {device_name!r}; pass target=<name> (known: "
                             f"{', '.join(names())}) or register this chip with gqla_compile.targets.register")


def _best_seconds(fn: Callable[[], object], budget_s: float, min_reps: int = 3) -> float:
    """Fastest of repeated runs of ``fn`` within a time budget (after one warm-up run)."""
    fn()
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    reps = 0
    while reps < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        reps += 1
    return best


def _matmul_flops(dtype: torch.dtype, n: int = 1024, budget_s: float = 0.5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), budget_s)


def _copy_bandwidth(n_bytes: int = 64 * 2**20, budget_s: float = 0.5) -> float:
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _best_seconds(lambda: dst.copy_(src), budget_s)  # each byte read once, written once


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: a figure the plan never depends on
        return 16.0 * 2**30


@functools.cache
def measure_cpu() -> Target:
    """This machine's achievable matmul FLOP/s (float32, and bfloat16 where torch runs it) and copy
    bandwidth, measured with torch in about 2 s and cached for the process."""
    peaks = {"float32": _matmul_flops(torch.float32)}
    try:
        peaks["bfloat16"] = _matmul_flops(torch.bfloat16)
    except RuntimeError as exc:  # a CPU build without bfloat16 matmul
        logger.info("bfloat16 matmul not measured on this CPU: %s", exc)
    bandwidth = _copy_bandwidth()
    target = Target("cpu", peaks, memory_bandwidth=bandwidth, memory_capacity=_physical_memory(),
                    interconnect_bandwidth=bandwidth / CPU_INTERCONNECT_FACTOR, devices_per_node=1)
    logger.info("measured cpu: %s, copy bandwidth %.1f GB/s",
                ", ".join(f"{d} {f / 1e9:.1f} GFLOP/s" for d, f in peaks.items()), bandwidth / 1e9)
    return target


# Targets built on first use: measuring takes seconds, so listing names must not trigger it.
_LAZY: dict[str, Callable[[], Target]] = {"cpu": measure_cpu}
