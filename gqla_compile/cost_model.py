"""Roofline cost model: which decoding path (``paths.PATHS``: absorbed-MQA, grouped-GQA, ...) is fastest for one
decode step of a latent-attention model on a target chip (DESIGN.md sections 1-2).

Per layer and tensor-parallel rank, each path's step is split into parts that are kept apart so that the
report can show where the time goes: reading the cache in the attention core, writing the new tokens'
cache entries, the attention projections (weight bytes, read once per step, and their FLOPs), the
all-reduce after o_proj and, for sparse attention (DSA), the indexer scoring every cached index key (the same
on every path: it is what still grows with the context). Each part costs max(bytes / bandwidth, FLOPs /
peak), divided by the efficiency the target measured for the kernel that runs it (``Target.efficiency``: the
weight GEMVs by new tokens, each path's attention core by query rows per cached head; 1 on datasheet
targets); the parts are summed (no overlap assumed, roofline.py), and the path with the smallest sum wins. Every
term and every choice a path offers (its RoPE-key layouts, its W_UV absorption, its attention-kernel class) is
asked of the path object; this module names no path.

Not counted: activations of the projections (KB next to MB of weights at decode batch sizes), the
query/output bytes of the attention core, kernel launch overheads and everything outside attention.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tabulate import tabulate

from . import targets as _targets
from .configuration_gqla import GqlaConfig
from .dims import OUTPUT_ABSORPTIONS, ROPE_KEYS, LatentDims, is_latent_config
from .errors import NoLatentAttentionError
from .forms import form_text
from .paths import PATHS, DecodePath, check_path_argument, check_shardable, feasible_paths
from .roofline import PathCost, Step, path_cost, priced_forms, projections
from .targets import DTYPE_BYTES, Target, dtype_name
from .units import duration, si

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class LayerPlan:
    """The decision for one decoder layer (all layers of a model share one shape, hence one decision)."""

    index: int
    path: str
    costs: Mapping[str, PathCost] = field(hash=False, repr=False)


@dataclass(frozen=True)
class Plan:
    """The cost model's decision with every figure it rests on; ``explain()`` shows them as a table."""

    path: str
    reason: str
    target: Target
    dims: LatentDims
    num_layers: int
    s_q: int
    batch_size: int
    context_len: int
    tp: int
    dtype: str
    rope_key: str
    peak_flops: float  # the target's peak for dtype
    costs: Mapping[str, PathCost] = field(hash=False)  # per feasible path
    output_absorption: str  # absorbed path: W_UV "folded" into o_proj or applied as a per-group "bmm"
    layers: tuple[LayerPlan, ...] = field(hash=False, repr=False)
    top_k: int | None = None  # sparse attention (DSA): tokens each query attends to; None: dense
    index_dims: tuple[int, int] | None = None  # its indexer's (heads, key dims), priced; None: not priced
    #: per feasible path: its compute forms (``FormChoice.describe``), each call kind priced in every form
    forms: Mapping[str, dict] = field(default_factory=dict, hash=False, repr=False)
    decode_path: DecodePath | None = field(default=None, hash=False, repr=False, compare=False)  # the chosen one

    @property
    def ridge(self) -> float:
        """The target's ridge point for dtype, in FLOP/B."""
        return self.peak_flops / self.target.memory_bandwidth

    @property
    def step_time_s(self) -> float:
        """Predicted attention time of one decode step on the chosen path."""
        return self.costs[self.path].step_time_s

    def explain(self) -> str:
        """A terminal table of every path's parts and totals, then the cache sizes and the reason."""
        rows = []
        for path, cost in self.costs.items():
            label = f"{path} *" if path == self.path else path
            for part in cost.parts:
                rows.append([label, part.name, si(part.bytes, "B"), si(part.flops, "FLOP"),
                             f"{part.arithmetic_intensity:.1f}", f"{self.ridge:.0f}", part.bound,
                             f"{part.efficiency:.2f}", duration(part.time_s)])
            rows.append([label, "total / layer", si(cost.bytes, "B"), si(cost.flops, "FLOP"),
                         f"{cost.arithmetic_intensity:.1f}", f"{self.ridge:.0f}", cost.bound, "",
                         duration(cost.time_s)])
            rows.append([label, f"step ({self.num_layers} layers)", "", "", "", "", "", "",
                         duration(cost.step_time_s)])
        table = tabulate(rows, headers=["path", "part", "bytes", "FLOPs", "AI (FLOP/B)", "ridge", "bound",
                                        "kernel efficiency", "time"], tablefmt="simple")
        header = (f"plan on {self.target.name}: {self.dtype}, s_q={self.s_q}, batch {self.batch_size}, "
                  f"context {self.context_len}, tp={self.tp}, RoPE key {self.rope_key}; figures per layer and rank")
        if self.top_k is not None:
            header += f"; sparse: each query attends to its top-{self.top_k} tokens"
            if self.index_dims is not None:
                header += f" (indexer: {self.index_dims[0]} heads x {self.index_dims[1]} over the context)"
        cache = "; ".join(f"{p} {c.cache_bytes_per_token} B ({c.cache_bytes_per_token_per_rank} B per rank)"
                          for p, c in self.costs.items())
        absorption = [text for p in PATHS.values() if (text := p.absorption_text(self.output_absorption))]
        return "\n".join([header, table, f"cache per token and layer: {cache}", *absorption, self.reason,
                          self.explain_forms()])

    def explain_forms(self) -> str:
        """The compute form each kind of call takes on each path, the crossover, and each form's predicted time."""
        rows = [[f"{path} *" if path == self.path else path, call["call"], call["new_tokens"], call["prefix"],
                 call["form"], ", ".join(f"{form} {duration(t)}" for form, t in call["time_s"].items())]
                for path, data in self.forms.items() for call in data["calls"]]
        lines = [f"compute form per call (the cache layout is the path's; the form with fewer FLOPs runs; times per "
                 f"layer and batch of {self.batch_size} at the roofline):",
                 tabulate(rows, headers=["path", "call", "new tokens", "prefix", "form", "time per form"],
                          tablefmt="simple", disable_numparse=True)]
        lines += [f"{path}: {form_text(data)}" for path, data in self.forms.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Every figure, JSON-serialisable."""
        return {
            "path": self.path,
            "reason": self.reason,
            "target": {**asdict(self.target), "ridge": self.ridge},
            "inputs": {"s_q": self.s_q, "batch_size": self.batch_size, "context_len": self.context_len,
                       "tp": self.tp, "dtype": self.dtype, "rope_key": self.rope_key, "top_k": self.top_k,
                       "index_dims": list(self.index_dims) if self.index_dims else None},
            "dims": self.dims.as_dict(),
            "num_layers": self.num_layers,
            "peak_flops": self.peak_flops,
            "ridge": self.ridge,
            "output_absorption": self.output_absorption,
            "paths": {p: c.to_dict() for p, c in self.costs.items()},
            "layers": [{"index": layer.index, "path": layer.path} for layer in self.layers],
            "forms": dict(self.forms),
        }


def _fastest_rope_key(step: Step, feasible: list[DecodePath]) -> str:
    """The RoPE-key layout whose step is fastest on the paths that offer a choice (``DecodePath.rope_keys``):
    keeping k_R once reads fewer bytes, so at the roofline it wins wherever such a core is bandwidth-bound; a
    measured target's kernel efficiencies can turn that (strided views read slower); where nothing differs
    (compute-bound, or no path with a choice) the first layout ("copied") stays."""
    choosing = [path for path in feasible if path.rope_keys]
    keys = [key for key in ROPE_KEYS if any(key in path.rope_keys for path in choosing)]
    if not keys:
        return ROPE_KEYS[0]
    times = {key: min(path_cost(path, replace(step, rope_key=key), 1, OUTPUT_ABSORPTIONS[0]).time_s
                      for path in choosing if key in path.rope_keys) for key in keys}
    return min(keys, key=times.__getitem__)  # ROPE_KEYS order: ties go to "copied"


def _cheapest_output_absorption(step: Step, feasible: list[DecodePath]) -> str:
    """How the paths with that choice (``DecodePath.output_absorptions``) should apply W_UV: whichever makes
    their projections cheapest.

    Folding W_UV into o_proj widens o_proj's columns from d_v to d_c per head, which costs more bytes and
    FLOPs than the per-group bmm unless the latent is barely wider than the heads.
    """
    choosing = [path for path in feasible if path.output_absorptions]
    choices = [o for o in OUTPUT_ABSORPTIONS if any(o in path.output_absorptions for path in choosing)]
    if not choices:
        return OUTPUT_ABSORPTIONS[0]
    return min(choices, key=lambda o: min(
        projections(step, path.projection_matmuls(step.dims, output_absorption=o)).time_s
        for path in choosing if o in path.output_absorptions))


def indexer_dims(model_or_config: Any) -> tuple[int, int] | None:
    """A sparse model's indexer as the cost model prices it, (index heads, index key dims), from the config
    fields transformers' DSA families name (``index_n_heads``, ``index_head_dim``); None without them."""
    config = _config_of(model_or_config)
    dims = (getattr(config, "index_n_heads", None), getattr(config, "index_head_dim", None))
    return None if None in dims else dims


def _check_workload(s_q: int, batch_size: int, context_len: int, tp: int, path: str, rope_key: str) -> None:
    for name, value in (("s_q", s_q), ("batch_size", batch_size), ("context_len", context_len), ("tp", tp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_path_argument(path)
    if rope_key != "auto" and rope_key not in ROPE_KEYS:
        raise ValueError(f"rope_key must be 'auto', 'copied' or 'shared', got {rope_key!r}")


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "get_text_config", lambda: config)()


def _latent_dims(config: Any) -> LatentDims:
    if not is_latent_config(config):
        raise NoLatentAttentionError(
            f"a model of type {getattr(config, 'model_type', type(config).__name__)!r} has no latent attention "
            "(no kv_lora_rank) to plan for; convert it to GQLA first with gqla_compile.convert(model, ...)"
        )
    return LatentDims.from_config(config)


def _default_dtype(model_or_config: Any) -> str:
    """bfloat16, the usual decode dtype, unless the model (or its config) is float32 or float16."""
    dtype = getattr(model_or_config, "dtype", None) or getattr(_config_of(model_or_config), "dtype", None)
    try:
        name = dtype_name(dtype) if dtype is not None else "bfloat16"
    except ValueError:
        name = "bfloat16"
    return name if name in ("float32", "float16") else "bfloat16"


def _reason(chosen: str, auto: str, costs: Mapping[str, PathCost], problems: Mapping[str, str | None], step: Step,
            forced: bool) -> str:
    """One sentence: which path wins and why (the attention cores' side of the ridge, and the times against the
    runner-up), or why it is the only one."""
    ridge = step.peak / step.bandwidth
    where = (f"on {step.target.name} at s_q={step.s_q}, batch {step.batch_size}, context {step.context_len}, "
             f"tp={step.tp}")
    if len(costs) == 1:
        why = "; ".join(problem for problem in problems.values() if problem)
        because = f"{auto} is the only path {where}: {why}"
    else:
        cores = ", ".join(
            f"{p} attention is {c.part('attention_core').bound}-bound "
            f"(AI {c.part('attention_core').arithmetic_intensity:.0f} "
            f"{'>' if c.part('attention_core').arithmetic_intensity > ridge else '<='} ridge {ridge:.0f})"
            for p, c in costs.items())
        win_t, lose_t = costs[auto].step_time_s, runner_up(costs, auto).step_time_s
        because = (f"{auto} wins {where}: {cores}; predicted step {duration(win_t)} vs {duration(lose_t)} "
                   f"({lose_t / win_t:.2f}x faster)")
    return f"path forced to {chosen}; the cost model would pick {because}" if forced else because


def runner_up(costs: Mapping[str, PathCost], path: str) -> PathCost:
    """The fastest of the other paths' costs (the one ``path`` is compared with)."""
    return min((c for p, c in costs.items() if p != path), key=lambda c: c.time_s)


def _step(model_or_config: Any, config: Any, dims: LatentDims, chip: Target, dtype: Any, top_k: int | None,
          index_dims: tuple[int, int] | None, **workload: int) -> Step:
    """The step the plan prices: the workload on the chip, in the model's dtype, for the config's sparsity."""
    top_k = top_k if top_k is not None else getattr(config, "index_topk", None)
    index_dims = index_dims if index_dims is not None else indexer_dims(config)
    dtype = dtype_name(dtype) if dtype is not None else _default_dtype(model_or_config)
    if workload["tp"] > chip.devices_per_node:
        logger.warning("tp=%d spans more than one %s node (%d devices): the all-reduce will be slower than "
                       "the interconnect figure says", workload["tp"], chip.name, chip.devices_per_node)
    return Step(dims, rope_key=ROPE_KEYS[0], dtype=dtype, dtype_bytes=DTYPE_BYTES[dtype], peak=chip.peak(dtype),
                bandwidth=chip.memory_bandwidth, link_bandwidth=chip.interconnect_bandwidth, target=chip,
                top_k=top_k, index_dims=index_dims, **workload)


def plan(
    model_or_config: Any,
    target: str | Target = "auto",
    *,
    s_q: int = 1,
    batch_size: int = 1,
    context_len: int = 4096,
    tp: int = 1,
    dtype: Any = None,
    path: str = "auto",
    rope_key: str = "auto",
    top_k: int | None = None,
    index_dims: tuple[int, int] | None = None,
    output_absorption: str = "auto",
) -> Plan:
    """Cost every decoding path of a latent-attention model for one decode step and pick the fastest.

    ``model_or_config``: a transformers model or config with latent attention (GQLA or MLA). ``target``: a
    name, a ``Target``, or "auto" (this machine's GPU, else the measured CPU). ``s_q``: tokens decoded per
    sequence and step (2 for MTP or speculative verification). ``path`` forces a path; the plan still
    costs every feasible one. ``rope_key``: whether a grouped cache copies the RoPE key into every group ("copied",
    a stock GQA layout) or keeps it once ("shared", fewer bytes to hold and read); "auto" takes the layout
    whose step is faster (ties: "copied"). ``Plan.rope_key`` is the layout taken. ``top_k``: sparse
    attention (DSA), each query attends to its top-k tokens, so the attention core costs k tokens instead of
    the context (default: the config's ``index_topk``, None for dense attention); ``index_dims``: its indexer's
    (index heads, index key dims), priced as one more part of every path (default: the config's
    ``index_n_heads`` and ``index_head_dim``; None: not priced). ``output_absorption``: how
    the paths with that choice (the absorbed path) apply W_UV ("bmm" or "folded" into o_proj); "auto" takes the cheaper.
    """
    _check_workload(s_q, batch_size, context_len, tp, path, rope_key)
    config = _config_of(model_or_config)
    dims = _latent_dims(config)
    step = _step(model_or_config, config, dims, _targets.resolve(target), dtype, top_k, index_dims, s_q=s_q,
                 batch_size=batch_size, context_len=context_len, tp=tp)
    problems = feasible_paths(dims, tp)
    feasible = [PATHS[p] for p, problem in problems.items() if problem is None]
    step = replace(step, rope_key=_fastest_rope_key(step, feasible) if rope_key == "auto" else rope_key)
    check_shardable(problems, path)
    if output_absorption not in ("auto", *OUTPUT_ABSORPTIONS):
        raise ValueError(f"output_absorption must be 'auto', {', '.join(map(repr, OUTPUT_ABSORPTIONS))}, got "
                         f"{output_absorption!r}")
    output = _cheapest_output_absorption(step, feasible) if output_absorption == "auto" else output_absorption
    return _decide(step, feasible, problems, path, output, getattr(config, "num_hidden_layers", 1))


def _decide(step: Step, feasible: list[DecodePath], problems: Mapping[str, str | None], path: str, output: str,
            num_layers: int) -> Plan:
    """Every feasible path priced, the fastest (or the forced one) taken, with its reason and compute forms."""
    costs = {p.name: path_cost(p, step, num_layers, output) for p in feasible}
    auto = min(costs, key=lambda p: costs[p].time_s)  # ties go to the first registered path (absorbed: smaller cache)
    chosen = auto if path == "auto" else path
    reason = _reason(chosen, auto, costs, problems, step, path != "auto")
    logger.debug("%s", reason)
    layers = tuple(LayerPlan(i, chosen, costs) for i in range(num_layers))
    forms = {p.name: priced_forms(p, step, output) for p in feasible}
    return Plan(chosen, reason, step.target, step.dims, num_layers, step.s_q, step.batch_size, step.context_len,
                step.tp, step.dtype, step.rope_key, step.peak, costs, output, layers, step.top_k,
                step.index_dims if step.top_k is not None else None, forms, PATHS[chosen])


def reference_configs() -> dict[str, Any]:
    """The two GQLA shapes the paper argues with, as ``GqlaConfig``s (attention dims only matter here)."""
    common = dict(qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, kv_lora_rank=512, num_key_value_heads=8,
                  dtype="bfloat16")
    return {
        # DeepSeek-V3's attention (61 layers, q_lora_rank 1536) with its 128 heads' up-projections in 8 groups
        "DeepSeek-V3-shaped": GqlaConfig(**common, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536,
                                         num_hidden_layers=61),
        # LLaMA-3-8B after TransGQLA: 8 KV heads become 8 groups over a 512 + 64 latent
        "LLaMA-3-8B-TransGQLA": GqlaConfig(**common, hidden_size=4096, num_attention_heads=32, q_lora_rank=None,
                                           num_hidden_layers=32),
    }


def choice_table(
    configs: Mapping[str, Any] | None = None,
    chips: Sequence[Target] = _targets.BUILTINS,
    s_qs: Sequence[int] = (1, 2, 4),
    batches: Sequence[int] = (1, 32),
    context_len: int = 4096,
) -> str:
    """Markdown table of the chosen path over targets x batch (rows) and shapes x s_q (columns).

    Each cell is the winning path and how much faster its predicted step is than the other path's.
    """
    configs = reference_configs() if configs is None else configs
    headers = ["target", "ridge (FLOP/B)", "batch",
               *(f"{name}, s_q={s}" for name in configs for s in s_qs)]
    rows = []
    for chip in chips:
        for batch in batches:
            cells = []
            for config in configs.values():
                for s in s_qs:
                    p = plan(config, chip, s_q=s, batch_size=batch, context_len=context_len)
                    cells.append(f"{p.path} {runner_up(p.costs, p.path).time_s / p.costs[p.path].time_s:.2f}x")
            rows.append([chip.name, f"{chip.ridge():.0f}", str(batch), *cells])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)

