"""Target chips for the cost model: peak dense matmul FLOP/s per dtype, memory bandwidth and capacity,
and the interconnect that tensor parallelism all-reduces over.

The built-in figures are vendor datasheet figures (dense, i.e. without 2:4 sparsity) so that the roofline
ridge (peak / bandwidth) is the one the paper reasons with. The ``cpu`` target is measured on this machine
instead (``measure_cpu``): a datasheet says little about what torch achieves on a shared 2-core box. Besides
the roofline figures, a measured target carries the efficiency of the kernels the rewritten graphs run, per
shape class (``KernelEfficiency``): the cost model divides each part's roofline time by it.

Conventions for the built-ins:
- ``float32`` is the plain FP32 (CUDA-core / vector) figure: torch's default float32 matmul does not use
  TF32 (``torch.backends.cuda.matmul.allow_tf32`` is False by default).
- ``float8`` is the dense FP8 (e4m3) tensor-core figure; chips without FP8 simply lack the key.
- ``interconnect_bandwidth`` is per device and per direction: half the datasheet's bidirectional NVLink /
  Infinity Fabric / PCIe figure, which is what a ring all-reduce's bus bandwidth is bounded by.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import attention, runtime
from . import kernels as cpu_kernels  # not `kernels`: that names the measured efficiencies here
from .dims import LatentDims
from .errors import UnknownTargetError
from .paths import PATHS, DecodePath

logger = logging.getLogger(__name__)

# dtype name -> bytes per element; also the dtypes a Target's peak_flops may name.
DTYPE_BYTES: dict[str, int] = {"float8": 1, "bfloat16": 2, "float16": 2, "float32": 4}

# The CPU "interconnect": TP ranks on one host all-reduce through shared memory, copying each byte into a
# shared buffer and back out again, so the link runs at about half the measured copy bandwidth.
CPU_INTERCONNECT_FACTOR = 2.0

_T = 1e12  # tera
_G = 1e9  # giga
_GB = 10**9  # datasheets quote decimal gigabytes


#: Kernel classes a measured target knows the efficiency of: the weight matmuls of a decode step (rows: the
#: step's new tokens) and the attention core of each decoding path (rows: query rows per cached head; its class
#: is the path's, ``DecodePath.attention_kernel``).
KERNEL_GEMV = "gemv"



@dataclass(frozen=True)
class KernelEfficiency:
    """The fraction of its roofline time a kernel class reaches, measured at a few row counts (the rows its
    matmuls multiply: 1 for a GEMV); between them the fraction is interpolated in log(rows), outside them
    the nearest measurement holds."""

    rows: tuple[int, ...]
    efficiency: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.rows or len(self.rows) != len(self.efficiency) or list(self.rows) != sorted(set(self.rows)):
            raise ValueError(f"KernelEfficiency needs increasing rows, one efficiency each; got {self}")
        if not all(0 < e for e in self.efficiency):
            raise ValueError(f"KernelEfficiency efficiencies must be positive; got {self.efficiency}")

    def at(self, rows: float) -> float:
        i = bisect.bisect_left(self.rows, rows)
        if i == 0:
            return self.efficiency[0]
        if i == len(self.rows):
            return self.efficiency[-1]
        lo, hi = self.rows[i - 1], self.rows[i]
        w = (math.log(rows) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return self.efficiency[i - 1] + w * (self.efficiency[i] - self.efficiency[i - 1])


@dataclass(frozen=True)
class Target:
    """One chip as the roofline sees it. All figures are per device. ``kernels``: measured efficiencies per
    kernel class (``KERNEL_GEMV``, ``DecodePath.attention_kernel``); a class without one runs at the roofline."""

    name: str
    peak_flops: Mapping[str, float] = field(hash=False)  # dtype name -> dense matmul FLOP/s
    memory_bandwidth: float  # B/s
    memory_capacity: float  # bytes
    interconnect_bandwidth: float  # B/s per device and direction, for the TP all-reduce
    devices_per_node: int = 8
    kernels: Mapping[str, KernelEfficiency] = field(default_factory=dict, hash=False)

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
        object.__setattr__(self, "kernels", dict(self.kernels))

    def efficiency(self, kernel: str, rows: float) -> float:
        """Measured fraction of the roofline a kernel class reaches at ``rows``; 1.0 where none was measured."""
        measured = self.kernels.get(kernel)
        return measured.at(rows) if measured is not None else 1.0

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


def median_seconds(fn: Callable[[], object], budget_s: float, min_reps: int = 3) -> float:
    """Median of repeated runs of ``fn`` within a time budget (after one warm-up run): on a shared machine
    the median is what a workload sees, the best run is not."""
    fn()
    samples = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def matmul_rates(dtype: torch.dtype, n: int = 1024, budget_s: float = 0.5) -> dict[str, float]:
    """FLOP/s of one square GEMM per CPU matmul library torch calls: MKL (torch.mm) and, where built in,
    oneDNN, which the decode core also runs (kernels.py)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    products = {"mkl": lambda: torch.mm(a, b)}
    if cpu_kernels.AVAILABLE:
        products["onednn"] = lambda: cpu_kernels.onednn_matmul(a[None], b[None])
    return {name: 2 * n**3 / median_seconds(product, budget_s) for name, product in products.items()}


def matmul_flops(dtype: torch.dtype, n: int = 1024, budget_s: float = 0.5) -> float:
    """The best square-GEMM rate of torch's CPU matmul libraries (:func:`matmul_rates`). On an AMD CPU with
    AVX-512, MKL takes its AVX2 path at less than half of oneDNN's rate: a roofline from torch.mm alone would
    hide that half of the chip."""
    return max(matmul_rates(dtype, n, budget_s).values())


def read_bandwidth(n_bytes: int = 256 * 2**20, budget_s: float = 0.5) -> float:
    """One streaming read (a sum) of a buffer far larger than the last-level cache, as decode reads weights
    and the cache."""
    data = torch.ones(n_bytes // 4)
    return n_bytes / median_seconds(lambda: data.sum(), budget_s)


def _copy_bandwidth(n_bytes: int = 64 * 2**20, budget_s: float = 0.5) -> float:
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * n_bytes / median_seconds(lambda: dst.copy_(src), budget_s)  # each byte read once, written once


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: a figure the plan never depends on
        return 16.0 * 2**30


#: Row counts the kernel efficiencies are measured at (tokens for the GEMV, query rows per cached head for
#: the attention cores: n_h / cached heads x s_q).
GEMV_ROWS: tuple[int, ...] = (1, 8, 32)
ATTENTION_ROWS: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
MULTI_TOKEN_ROWS: tuple[int, ...] = (2, 4, 8, 16, 64)
#: The shape classes measured: weights of a ~100M model's MLP ([2048, 768], rotated through more than a
#: last-level cache's worth so each is read from memory) and a cache of CALIBRATION_CONTEXT tokens in each
#: path's layout (absorbed: one head [c ; k_R] of 256 + 32, values its first 256; grouped: 4 groups of
#: no-RoPE keys 64, RoPE key 32 (copied into each group or kept once) and values 64).
GEMV_SHAPE = (2048, 768)
GEMV_WEIGHTS_BYTES = 96 * 2**20
CALIBRATION_CONTEXT = 16384
CLASS_DIMS = {"d_c": 256, "d_R": 32, "n_g": 4, "d_n": 64, "d_v": 64}


def _roofline_seconds(n_bytes: float, flops: float, bandwidth: float, peak: float) -> float:
    return max(n_bytes / bandwidth, flops / peak)


def _gemv_efficiency(bandwidth: float, peak: float, budget_s: float) -> KernelEfficiency:
    out_features, in_features = GEMV_SHAPE
    count = max(1, GEMV_WEIGHTS_BYTES // (out_features * in_features * 4))
    weights = [torch.randn(out_features, in_features) for _ in range(count)]
    efficiency = []
    for rows in GEMV_ROWS:
        x = torch.randn(rows, in_features)

        def step():
            for w in weights:
                torch.nn.functional.linear(x, w)

        roof = _roofline_seconds(count * weights[0].numel() * 4, count * 2 * rows * weights[0].numel(), bandwidth,
                                 peak)
        efficiency.append(roof / median_seconds(step, budget_s))
    return KernelEfficiency(GEMV_ROWS, tuple(efficiency))


def _attention_efficiency(decode: DecodePath, rope_key: str, bandwidth: float, peak: float, budget_s: float, *,
                          multi_token: bool = False) -> KernelEfficiency:
    """The runtime's own decode attention (``attention_over_cache`` on the views the installed core reads)
    for one sequence over CALIBRATION_CONTEXT cached tokens in the layout of CLASS_DIMS, against its
    roofline. The rows per cached head are query heads of one new token, or (``multi_token``) new tokens of
    one head per cached head."""
    s, d = CALIBRATION_CONTEXT, CLASS_DIMS
    dims = LatentDims(n_h=d["n_g"], n_g=d["n_g"], d_c=d["d_c"], d_R=d["d_R"], d_n=d["d_n"], d_v=d["d_v"],
                      hidden_size=1, q_lora_rank=None)
    key_shape, value_shape = decode.cache_shapes(dims, 1, s, rope_key=rope_key)
    generator = torch.Generator().manual_seed(0)
    key, value = torch.randn(key_shape, generator=generator), torch.randn(value_shape, generator=generator)
    keys, values = decode.cache_views(dims, key, value, rope_key=rope_key)
    cached_heads = values.shape[1]
    cached_bytes = s * decode.cache_elements(dims, rope_key=rope_key) * 4
    efficiency = []
    all_rows = MULTI_TOKEN_ROWS if multi_token else ATTENTION_ROWS
    for rows in all_rows:
        heads, tokens = (cached_heads, rows) if multi_token else (cached_heads * rows, 1)
        query = torch.randn(1, heads, tokens, decode.query_head_dims(dims), generator=generator)
        flops = 2 * heads * tokens * s * decode.attention_head_dims(dims)
        seconds = median_seconds(lambda: attention.attention_over_cache(query, keys, values, None, 1.0), budget_s)
        efficiency.append(_roofline_seconds(cached_bytes, flops, bandwidth, peak) / seconds)
    return KernelEfficiency(all_rows, tuple(efficiency))


def _cache_file() -> Path:
    """One JSON per CPU model, torch version and thread count under ~/.cache/gqla_compile (or
    $GQLA_COMPILE_CACHE)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # the runtime's, the attention's and the kernels' source are part of the key: a changed attention kernel is
    # measured afresh
    source = hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                     for m in (runtime, attention, cpu_kernels))).hexdigest()
    identity = f"{cpu}|{os.cpu_count()}|{torch.__version__}|{source}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    root = Path(os.environ.get("GQLA_COMPILE_CACHE", Path.home() / ".cache" / "gqla_compile"))
    return root / f"cpu-{torch.get_num_threads()}threads-{digest}.json"


def _target_from_json(data: dict) -> Target:
    kernels = {k: KernelEfficiency(tuple(v["rows"]), tuple(v["efficiency"])) for k, v in data.pop("kernels").items()}
    return Target(**data, kernels=kernels)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def measure_cpu_now(budget_s: float = 0.3) -> Target:
    """Measure this machine at the current torch thread count (about 20 s): float32 (and bfloat16) matmul
    rate, streaming read bandwidth, and the efficiency of the weight GEMVs and of each path's attention
    core (``KernelEfficiency``). The interconnect is the copy bandwidth / CPU_INTERCONNECT_FACTOR."""
    peaks = {"float32": matmul_flops(torch.float32)}
    try:
        peaks["bfloat16"] = matmul_flops(torch.bfloat16)
    except RuntimeError as exc:  # a CPU build without bfloat16 matmul
        logger.info("bfloat16 matmul not measured on this CPU: %s", exc)
    bandwidth = read_bandwidth()
    copy = _copy_bandwidth()
    with torch.no_grad():
        kernels = {KERNEL_GEMV: _gemv_efficiency(bandwidth, peaks["float32"], budget_s)}
        for path, multi_token in itertools.product(PATHS.values(), (False, True)):
            for rope_key in path.kernel_layouts():
                kernels[path.attention_kernel(rope_key, multi_token=multi_token)] = _attention_efficiency(
                    path, rope_key, bandwidth, peaks["float32"], budget_s, multi_token=multi_token)
    target = Target("cpu", peaks, memory_bandwidth=bandwidth, memory_capacity=_physical_memory(),
                    interconnect_bandwidth=copy / CPU_INTERCONNECT_FACTOR, devices_per_node=1, kernels=kernels)
    logger.info("measured cpu (%d threads): %s, read bandwidth %.1f GB/s, kernel efficiencies %s",
                torch.get_num_threads(), ", ".join(f"{d} {f / 1e9:.1f} GFLOP/s" for d, f in peaks.items()),
                bandwidth / 1e9, {k: [round(e, 2) for e in v.efficiency] for k, v in kernels.items()})
    return target


_MEASURED: dict[Path, Target] = {}


def measure_cpu(*, refresh: bool = False) -> Target:
    """This machine as a target, measured once (``measure_cpu_now``) per CPU, torch version, runtime source
    and thread count, and kept in a JSON file under ~/.cache/gqla_compile (``GQLA_COMPILE_CACHE`` moves it);
    ``refresh`` measures again and rewrites it. Same object for the whole process."""
    path = _cache_file()
    if not refresh and path in _MEASURED:
        return _MEASURED[path]
    target = None
    if not refresh and path.exists():
        try:
            target = _target_from_json(json.loads(path.read_text()))
            logger.info("cpu target read from %s", path)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable cpu measurement %s (%s); measuring again", path, exc)
    if target is None:
        target = measure_cpu_now()
        data = asdict(target)
        data["kernels"] = {k: {"rows": list(v.rows), "efficiency": list(v.efficiency)}
                           for k, v in target.kernels.items()}
        _write_atomically(path, json.dumps(data, indent=1))
    _MEASURED[path] = target
    return target


# Targets built on first use: measuring takes seconds, so listing names must not trigger it.
_LAZY: dict[str, Callable[[], Target]] = {"cpu": measure_cpu}
