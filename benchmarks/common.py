"""Shared pieces of the benchmark suite: timing, machine facts, models and their variants, decode steps on a
filled cache, and writing results (JSON per part, Markdown tables for the summary).

Every part of the suite (decode, cost_model, sq, prompt_lookup, gpu) measures through these functions, so
the CPU and GPU runs and all parts time the same way:

- ``time_call``: warm-up calls, then repeats until both a minimum count and a time budget are reached (or a
  maximum count); median, min/max and the inter-quartile range.
- ``decode_timer``: one steady-state decode step of ``s_q`` new tokens per sequence on a cache holding
  ``context`` tokens. The cache is a transformers ``StaticCache`` sized ``context + s_q`` and filled with
  random entries in the model's own layout (the layout is read off one eager 1-token call); after every
  timed step its write position is reset, so every step sees exactly ``context`` cached tokens and writes
  the same slots. Filling instead of prefilling keeps a 8192 x 8 context affordable on 2 cores (the
  prefill is not what is measured; attention cost does not depend on the cached values).
"""

from __future__ import annotations

import argparse

import copy
import gc
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gqla_compile.paths import PATH_NAMES as PATHS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Names a Python with vLLM and this package installed, for the parts that run vLLM engines.
VLLM_PYTHON_ENV = "GQLA_VLLM_PYTHON"
VARIANTS: tuple[str, ...] = ("original", *PATHS)  # original: the unmodified transformers model


# ---------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and spread over ``n`` timed calls."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        ordered = sorted(samples)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, len(ordered))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 30,
    budget_s: float = 1.0,
    sync: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then at least ``min_repeats`` timed calls and more while the
    time budget lasts (at most ``max_repeats``). ``sync`` runs before each clock read (CUDA); ``after``
    runs after each call outside the timed region (resetting a cache)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        if after:
            after()
    sync()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_repeats or (len(samples) < max_repeats and time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
        if after:
            after()
    return Timing.of(samples)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


# ------------------------------------------------------------------------------------------ machine


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, versions, load average, GPU if used."""
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": load_average(),
        "device": device,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------- output


def write_json(out_dir: str | Path, part: str, payload: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{part}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    from tabulate import tabulate

    return tabulate([[_cell(c) for c in row] for row in rows], headers=list(headers), tablefmt="github",
                    disable_numparse=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def try_plot(path: Path, draw: Callable[[Any], None]) -> Path | None:
    """A small PNG drawn by ``draw(pyplot)`` when matplotlib is installed; None (and nothing written) if not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = plt.figure(figsize=(5, 3.2), dpi=100)
    try:
        draw(plt)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- models


def model_config(shape: str, *, quick: bool = False, **overrides: Any):
    """The benchmark model shapes, all with random weights.

    ``gqla``: a GqlaConfig with n_g = 4 < n_h = 16 (the GQLA case the grouped path is made for).
    ``deepseek-v3``: a DeepSeek-V3-style MLA (n_g = n_h) with dense MLPs. Both ~100M parameters
    (hidden 768, 12 layers, 16 heads, d_c 256, d_R 32, d_n 64, d_v 64, MLP 2048, vocab 8192);
    ``quick`` gives tiny versions of the same shapes for tests.
    """
    if quick:
        dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32,
                    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, intermediate_size=128, vocab_size=256)
        groups = 2
    else:
        dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=16, kv_lora_rank=256,
                    qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, intermediate_size=2048, vocab_size=8192)
        groups = 4
    dims.update(max_position_embeddings=16384, tie_word_embeddings=False)
    if shape == "gqla":
        from gqla_compile.configuration_gqla import GqlaConfig

        return GqlaConfig(**{**dims, "num_key_value_heads": groups, "q_lora_rank": None, **overrides})
    if shape == "deepseek-v3":
        from transformers import DeepseekV3Config

        layers = overrides.get("num_hidden_layers", dims["num_hidden_layers"])
        return DeepseekV3Config(**{
            **dims, "num_key_value_heads": dims["num_attention_heads"], "q_lora_rank": None,
            "first_k_dense_replace": layers, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_mtp_layers": 0,
            **overrides})
    raise ValueError(f"unknown benchmark shape {shape!r}; known: gqla, deepseek-v3")


SHAPES: tuple[str, ...] = ("gqla", "deepseek-v3")


def build_model(config, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """The unmodified transformers model (random weights, eval mode) for a config."""
    from transformers import AutoModelForCausalLM

    import gqla_compile  # noqa: F401 - registers the gqla model type

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def optimized_copy(model, path: str, *, compile: bool, target: Any = "cpu", s_q: int = 1,
                   compile_mode: str | None = None):
    """A deep copy of ``model`` rewritten by ``gqla_compile.optimize`` to ``path`` (eager or Inductor);
    also returns the seconds ``optimize`` took (capture, rewrite, verification, wrapping; Inductor itself
    compiles lazily on the first calls). ``compile_mode`` (e.g. "reduce-overhead" for CUDA graphs) wraps
    the eager rewrite with ``torch.compile(mode=...)`` instead of optimize's own Inductor wrapper."""
    import gqla_compile

    clone = copy.deepcopy(model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gqla_compile.optimize(clone, target=target, path=path, s_q=s_q, compile=compile and compile_mode is None)
    if compile and compile_mode is not None:
        clone.forward = torch.compile(clone.forward, mode=compile_mode)
    return clone, time.perf_counter() - start


class ModelPool:
    """Models built once per run and shared by the parts: the unmodified model per shape and its
    rewritten copies per (path, compiled), so that Inductor compiles each once per process."""

    def __init__(self, *, quick: bool, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 config_overrides: dict[str, Any] | None = None, target: Any = "cpu",
                 custom: tuple[str, Any, Callable[[], Any]] | None = None, compile_mode: str | None = None):
        self.quick, self.dtype, self.device, self.target = quick, dtype, device, target
        self.compile_mode = compile_mode
        self.config_overrides = config_overrides or {}
        self.custom = custom  # (name, config, factory of the unmodified model): a user's model replaces the shapes
        self._models: dict[tuple, Any] = {}
        self.optimize_seconds: dict[tuple, float] = {}

    @property
    def shapes(self) -> list[str] | None:
        """The user's model name when one was given, else None (each part uses its own shapes)."""
        return [self.custom[0]] if self.custom else None

    def config(self, shape: str):
        if self.custom:
            return self.custom[1]
        return model_config(shape, quick=self.quick, **self.config_overrides)

    def get(self, shape: str, variant: str, compiled: bool = False):
        if variant == "original" and compiled:
            # what a user would try instead of the rewrite: transformers' model under torch.compile (Inductor)
            key = (shape, "original", True)
            if key not in self._models:
                start = time.perf_counter()
                model = copy.deepcopy(self.get(shape, "original"))
                model.forward = torch.compile(model.forward, mode=self.compile_mode)
                self._models[key] = model
                self.optimize_seconds[key] = time.perf_counter() - start
            return self._models[key]
        if variant == "original":
            key = (shape, "original", False)
            if key not in self._models:
                if self.custom:
                    model = self.custom[2]().to(device=self.device, dtype=self.dtype).eval()
                else:
                    model = build_model(self.config(shape), dtype=self.dtype, device=self.device)
                self._models[key] = model
            return self._models[key]
        key = (shape, variant, compiled)
        if key not in self._models:
            model, seconds = optimized_copy(self.get(shape, "original"), variant, compile=compiled, target=self.target,
                                            compile_mode=self.compile_mode)
            self._models[key] = model
            self.optimize_seconds[key] = seconds
        return self._models[key]

    def drop(self, shape: str) -> None:
        for key in [k for k in self._models if k[0] == shape]:
            del self._models[key]
        gc.collect()


def eager_forward(model) -> Callable[..., Any]:
    """The model's forward without torch.compile's wrapper (optimize(compile=True) wraps ``model.forward``)."""
    return type(model).forward.__get__(model)


def variant_label(variant: str, compiled: bool) -> str:
    if variant == "original":
        return f"transformers ({'StaticCache + torch.compile' if compiled else 'eager'})"
    return f"{variant} ({'compiled' if compiled else 'eager'})"


# -------------------------------------------------------------------------------------- decode steps


def cache_layout(model, device: str = "cpu") -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer, (key heads, key dim) and (value heads, value dim) the model writes into its cache, read
    off one eager one-token call (no Inductor compile is triggered)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        eager_forward(model)(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), cache=cache, use_cache=True)
    return [((layer.keys.shape[1], layer.keys.shape[-1]), (layer.values.shape[1], layer.values.shape[-1]))
            for layer in cache.layers]


def cache_bytes(layout, batch: int, tokens: int, dtype: torch.dtype) -> int:
    elements = sum(kh * kd + vh * vd for (kh, kd), (vh, vd) in layout)
    return batch * tokens * elements * torch.empty((), dtype=dtype).element_size()


def filled_cache(model, layout, *, batch: int, context: int, s_q: int, dtype: torch.dtype, device: str,
                 seed: int = 0):
    """A StaticCache of ``context + s_q`` slots holding ``context`` random tokens in the model's layout."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + s_q)
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer, ((kh, kd), (vh, vd)) in zip(cache.layers, layout):
        keys = torch.randn(batch, kh, context, kd, generator=generator, device=device).to(dtype)
        values = torch.randn(batch, vh, context, vd, generator=generator, device=device).to(dtype)
        layer.update(keys, values)
        del keys, values
    return cache


class DecodeTimer:
    """Steady-state decode steps of one model at one (batch, context, s_q): each call runs the model's own
    forward (compiled or not) on ``s_q`` new tokens per sequence, then resets the cache's write position."""

    def __init__(self, model, *, batch: int, context: int, s_q: int = 1, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", layout=None):
        self.model, self.context, self.device = model, context, device
        self.layout = layout or cache_layout(model, device)
        self.cache_bytes = cache_bytes(self.layout, batch, context, dtype)
        self.cache = filled_cache(model, self.layout, batch=batch, context=context, s_q=s_q, dtype=dtype,
                                  device=device)
        vocab = model.config.get_text_config().vocab_size
        self.input_ids = torch.randint(0, vocab, (batch, s_q), device=device,
                                       generator=torch.Generator(device=device).manual_seed(1))

    def step(self):
        with torch.no_grad():
            return self.model(input_ids=self.input_ids, cache=self.cache, use_cache=True, logits_to_keep=1)

    def reset(self) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.context)

    def time(self, **timing: Any) -> Timing:
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else None
        return time_call(self.step, after=self.reset, sync=sync, **timing)

    def close(self) -> None:
        self.cache = None
        gc.collect()


# ------------------------------------------------------------------------------------- shared runs


SLOW_STEP_S = 8.0


class Measurements:
    """Decode-step timings memoized per (shape, variant, compiled, batch, context, s_q), so that parts
    measuring the same point in one run (cost_model's grid and sq's curve) time it once."""

    def __init__(self, pool: ModelPool, *, budget_s: float = 1.0, max_cache_bytes: float = 4e9):
        self.pool, self.budget_s, self.max_cache_bytes = pool, budget_s, max_cache_bytes
        self._done: dict[tuple, dict[str, Any]] = {}
        self._layouts: dict[tuple, Any] = {}

    def layout(self, shape: str, variant: str, compiled: bool):
        key = (shape, variant)
        if key not in self._layouts:
            self._layouts[key] = cache_layout(self.pool.get(shape, variant, compiled), self.pool.device)
        return self._layouts[key]

    def decode(self, shape: str, variant: str, compiled: bool, *, batch: int, context: int, s_q: int = 1
               ) -> dict[str, Any]:
        """{"timing": Timing | None, "cache_bytes", "first_call_s", "skipped": reason | None}."""
        key = (shape, variant, compiled, batch, context, s_q, torch.get_num_threads())
        if key in self._done:
            return self._done[key]
        model = self.pool.get(shape, variant, key[2])
        layout = self.layout(shape, variant, key[2])
        n_bytes = cache_bytes(layout, batch, context, self.pool.dtype)
        result: dict[str, Any] = {"cache_bytes": n_bytes, "timing": None, "first_call_s": None, "skipped": None}
        if n_bytes > self.max_cache_bytes:
            result["skipped"] = f"cache of {n_bytes / 1e9:.1f} GB exceeds the {self.max_cache_bytes / 1e9:.1f} GB limit"
        else:
            timer = DecodeTimer(model, batch=batch, context=context, s_q=s_q, dtype=self.pool.dtype,
                                device=self.pool.device, layout=layout)
            start = time.perf_counter()
            timer.step()
            timer.reset()
            first = time.perf_counter() - start
            # slow points (seconds per step) get fewer repeats; the first call was the warm-up. An eager step
            # slower than SLOW_STEP_S is timed by that one call (n = 1 in the record): it has no warm-up to do.
            if first > SLOW_STEP_S and not key[2]:
                result["timing"] = Timing.of([first])
            else:
                result["timing"] = timer.time(warmup=0, min_repeats=3 if first < 2 else 2, budget_s=self.budget_s)
            result["first_call_s"] = first
            timer.close()
        self._done[key] = result
        return result


def add_common_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model and contexts: seconds, for tests")
    parser.add_argument("--no-compile", action="store_true", help="skip the Inductor-compiled variants")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for <part>.json (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine, a second thread that gets "
                             "preempted stalls every parallel matmul; 1 thread gives stable timings)")


def apply_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def part_main(module_name: str, doc: str, run, summary, argv=None, *, compiles: bool = True) -> int:
    """``python -m benchmarks.<part>``: the common options, then run the part and print its summary."""
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", description=doc.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    options = {"compile": not args.no_compile} if compiles else {}
    print(summary(run(args.out, quick=args.quick, **options)))
    return 0


def vllm_python(explicit: str | None = None) -> tuple[str | None, str | None]:
    """(the Python that runs vLLM engines, None) or (None, why there is none): ``explicit``, else
    ``$GQLA_VLLM_PYTHON``, else the environment .ci/run builds (``$GQLA_VLLM_ENV``, default .venv-vllm beside
    this checkout), else this Python when it imports vLLM."""
    import importlib.util
    import sys

    if explicit or os.environ.get(VLLM_PYTHON_ENV):
        return explicit or os.environ[VLLM_PYTHON_ENV], None
    built = Path(os.environ.get("GQLA_VLLM_ENV", Path(__file__).resolve().parents[1] / ".venv-vllm")) / "bin" / "python"
    if built.exists():
        return str(built), None
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, None
    return None, (f"vLLM is not importable here, no --vllm-python / ${VLLM_PYTHON_ENV} names a Python that has it "
                  "and .ci/run's .venv-vllm does not exist")
