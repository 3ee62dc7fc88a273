"""Roofline cost model: which decoding path (absorbed-MQA or grouped-GQA) is faster for one decode step of
a latent-attention model on a target chip (DESIGN.md sections 1-2).

Per layer and tensor-parallel rank, each path's step is split into parts that are kept apart so that the
report can show where the time goes: reading the cache in the attention core, writing the new tokens'
cache entries, the attention projections (weight bytes, read once per step, and their FLOPs), the
all-reduce after o_proj and, for sparse attention (DSA), the indexer scoring every cached index key (the same
on both paths: it is what still grows with the context). Each part costs max(bytes / bandwidth, FLOPs /
peak), divided by the efficiency the target measured for the kernel that runs it (``Target.efficiency``: the
weight GEMVs by new tokens, each path's attention core by query rows per cached head; 1 on datasheet
targets); the parts are summed (no overlap assumed), and the path with the smaller sum wins.

Not counted: activations of the projections (KB next to MB of weights at decode batch sizes), the
query/output bytes of the attention core, kernel launch overheads and everything outside attention.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tabulate import tabulate

from . import targets as _targets
from .configuration_gqla import GqlaConfig
from .dims import OUTPUT_ABSORPTIONS, QUERY_ABSORPTION, ROPE_KEYS, LatentDims, is_latent_config
from .errors import NoLatentAttentionError
from .forms import ComputeForm, form_text
from .paths import PATHS, DecodePath, Matmul, check_path_argument, feasible_paths
from .targets import DTYPE_BYTES, KERNEL_GEMV, Target, attention_kernel, dtype_name
from .units import duration, si

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class PartCost:
    """One part of a path's step on one rank: its traffic, its work, and the roofline's verdict."""

    name: str
    bytes: float
    flops: float
    time_s: float
    bound: str  # "memory", "compute" or "interconnect"
    efficiency: float = 1.0  # measured fraction of the roofline its kernel reaches (time_s includes it)

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "arithmetic_intensity": self.arithmetic_intensity}


@dataclass(frozen=True)
class PathCost:
    """One path's cost per decode step, per layer and per rank, split into parts."""

    path: str
    parts: tuple[PartCost, ...]
    num_layers: int
    cache_bytes_per_token: int  # per layer, the whole layer (all ranks together)
    cache_bytes_per_token_per_rank: int  # per layer, what one rank holds

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.parts)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.parts)

    @property
    def time_s(self) -> float:
        """Predicted time of one layer's attention for one decode step."""
        return sum(p.time_s for p in self.parts)

    @property
    def step_time_s(self) -> float:
        """Predicted attention time of one decode step through the whole model."""
        return self.num_layers * self.time_s

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    @property
    def bound(self) -> str:
        """The bound of the part that takes the most time."""
        return max(self.parts, key=lambda p: p.time_s).bound

    def part(self, name: str) -> PartCost:
        return next(p for p in self.parts if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        totals = ("bytes", "flops", "time_s", "step_time_s", "arithmetic_intensity", "bound",
                  "cache_bytes_per_token", "cache_bytes_per_token_per_rank")
        return {"path": self.path, "parts": [p.to_dict() for p in self.parts],
                **{name: getattr(self, name) for name in totals}}


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

    @property
    def ridge(self) -> float:
        """The target's ridge point for dtype, in FLOP/B."""
        return self.peak_flops / self.target.memory_bandwidth

    @property
    def step_time_s(self) -> float:
        """Predicted attention time of one decode step on the chosen path."""
        return self.costs[self.path].step_time_s

    def explain(self) -> str:
        """A terminal table of both paths' parts and totals, then the cache sizes and the reason."""
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
        absorption = f"absorbed path applies W_UK as {QUERY_ABSORPTION}, W_UV as {self.output_absorption}"
        return "\n".join([header, table, f"cache per token and layer: {cache}", absorption, self.reason,
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


@dataclass(frozen=True)
class _Step:
    """The workload of one decode step on one rank, and the roofline it runs on."""

    dims: LatentDims
    s_q: int
    batch_size: int
    context_len: int
    tp: int
    rope_key: str
    dtype_bytes: int
    peak: float
    bandwidth: float
    link_bandwidth: float
    target: Target | None = None  # its kernel efficiencies; None: the plain roofline
    top_k: int | None = None  # sparse attention: tokens each query attends to
    index_dims: tuple[int, int] | None = None  # sparse attention's indexer: (index heads, index key dims)

    @property
    def tokens(self) -> int:
        """New tokens in the step: every sequence of the batch decodes s_q of them."""
        return self.batch_size * self.s_q

    def part(self, name: str, elements: float, flops: float, *, over_link: bool = False,
             kernel: tuple[str, float] | None = None) -> PartCost:
        """The one place a part's time and bound are decided: max(bytes / bandwidth, FLOPs / peak), over the
        measured efficiency of ``kernel`` = (kernel class, rows) where the target has one."""
        n_bytes = elements * self.dtype_bytes
        bandwidth, medium = (self.link_bandwidth, "interconnect") if over_link else (self.bandwidth, "memory")
        transfer, compute = n_bytes / bandwidth, flops / self.peak
        efficiency = self.target.efficiency(*kernel) if kernel and self.target is not None else 1.0
        return PartCost(name, n_bytes, flops, max(transfer, compute) / efficiency,
                        medium if transfer >= compute else "compute", efficiency)


def _projections(step: _Step, matmuls: Iterable[Matmul]) -> PartCost:
    elements = flops = 0.0
    for m in matmuls:
        share = step.tp if m.sharded else 1
        elements += m.weight_elements / share
        flops += step.tokens * m.flops_per_token / share
    return step.part("projections", elements, flops, kernel=(KERNEL_GEMV, step.tokens))


def _attention_core(path: DecodePath, step: _Step) -> PartCost:
    """Read the cache over the context; scores, softmax and values (DESIGN.md section 2 table)."""
    flops_per_token = 2 * (step.dims.n_h // step.tp) * step.s_q * path.attention_head_dims(step.dims)
    contexts = step.batch_size * path.attended_tokens(step.context_len, step.top_k)
    rank_elements = path.rank_cache_elements(step.dims, step.tp, rope_key=step.rope_key)
    rows = path.query_rows_per_cached_head(path.rank_dims(step.dims, step.tp)) * step.s_q
    return step.part("attention_core", contexts * rank_elements, contexts * flops_per_token,
                     kernel=(attention_kernel(path.name, step.rope_key, multi_token=step.s_q > 1), rows))


def _indexer(step: _Step) -> PartCost:
    """A sparse step's indexer (DSA): every new token scores the whole context's cached index keys (one head
    of d_I per token, read once per step) with its n_I index heads. Its own projections and the top-k are
    not counted."""
    heads, dims = step.index_dims
    return step.part("indexer", step.batch_size * step.context_len * dims,
                     2 * step.tokens * heads * dims * step.context_len)


def _all_reduce(step: _Step) -> PartCost:
    """Ring all-reduce of o_proj's output: 2 (P - 1) / P of the activations cross each rank's link."""
    p = step.tp
    return step.part("all_reduce", 2 * (p - 1) / p * step.tokens * step.dims.hidden_size, 0.0, over_link=True)


def _path_cost(path: DecodePath, step: _Step, num_layers: int, output: str) -> PathCost:
    rank_elements = path.rank_cache_elements(step.dims, step.tp, rope_key=step.rope_key)
    parts = (
        _attention_core(path, step),
        step.part("cache_write", step.tokens * rank_elements, 0.0),
        _projections(step, path.projection_matmuls(step.dims, output_absorption=output)),
        _all_reduce(step),
    ) + ((_indexer(step),) if step.top_k is not None and step.index_dims is not None else ())
    whole_elements = path.cache_elements(step.dims, rope_key=step.rope_key)
    return PathCost(path.name, parts, num_layers, whole_elements * step.dtype_bytes,
                    rank_elements * step.dtype_bytes)


def call_time_s(form: ComputeForm, step: _Step, new: int, prefix: int) -> float:
    """One layer's attention for one call of ``new`` tokens after ``prefix`` cached ones in ``form``, for the
    step's batch on one rank (the form's terms are the rank's): max(bytes / bandwidth, FLOPs / peak)."""
    keys = prefix + new
    part = step.part("call", step.batch_size * keys * form.elements_per_key,
                     step.batch_size * form.flops(new, keys))
    return part.time_s


def _forms(path: DecodePath, step: _Step, output: str) -> dict[str, Any]:
    """A path's compute forms for the plan: the description, each call kind priced in every form."""
    choice = path.compute_forms(path.rank_dims(step.dims, step.tp), output_absorption=output)
    data = choice.describe(s_q=step.s_q, context_len=step.context_len)
    for call in data["calls"]:
        call["time_s"] = {form.name: call_time_s(form, step, call["new_tokens"], call["prefix"])
                          for form in choice.forms}
    return data


def _fastest_rope_key(step: _Step, grouped_feasible: bool) -> str:
    """The grouped cache layout whose step is faster: keeping k_R once reads fewer bytes, so at the roofline
    it wins wherever the attention core is bandwidth-bound; a measured target's kernel efficiencies can turn
    that (strided views read slower); where nothing differs (compute-bound, or no grouped path) the copied
    layout stays."""
    if not grouped_feasible:
        return "copied"
    times = {key: _path_cost(PATHS["grouped"], replace(step, rope_key=key), 1, "bmm").time_s for key in ROPE_KEYS}
    return min(ROPE_KEYS, key=times.__getitem__)  # ROPE_KEYS order: ties go to "copied"


def _cheapest_output_absorption(step: _Step) -> str:
    """How the absorbed path should apply W_UV: whichever makes its projections cheapest.

    Folding W_UV into o_proj widens o_proj's columns from d_v to d_c per head, which costs more bytes and
    FLOPs than the per-group bmm unless the latent is barely wider than the heads.
    """
    absorbed = PATHS["absorbed"]
    return min(OUTPUT_ABSORPTIONS,
               key=lambda o: _projections(step, absorbed.projection_matmuls(step.dims, output_absorption=o)).time_s)


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


def _reason(chosen: str, auto: str, costs: Mapping[str, PathCost], step: _Step, target: Target,
            forced: bool, ridge: float) -> str:
    """One sentence: which path wins and why (the attention cores' side of the ridge, and the times)."""
    where = f"on {target.name} at s_q={step.s_q}, batch {step.batch_size}, context {step.context_len}, tp={step.tp}"
    if len(costs) == 1:
        (only,) = costs
        other = next(p for p in PATHS if p != only)
        because = f"{only} is the only path {where}: {PATHS[other].shard_problem(step.dims, step.tp)}"
    else:
        cores = ", ".join(
            f"{p} attention is {c.part('attention_core').bound}-bound "
            f"(AI {c.part('attention_core').arithmetic_intensity:.0f} "
            f"{'>' if c.part('attention_core').arithmetic_intensity > ridge else '<='} ridge {ridge:.0f})"
            for p, c in costs.items())
        loser = next(p for p in costs if p != auto)
        win_t, lose_t = costs[auto].step_time_s, costs[loser].step_time_s
        because = (f"{auto} wins {where}: {cores}; predicted step {duration(win_t)} vs {duration(lose_t)} "
                   f"({lose_t / win_t:.2f}x faster)")
    return f"path forced to {chosen}; the cost model would pick {because}" if forced else because


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
    """Cost both decoding paths of a latent-attention model for one decode step and pick the faster one.

    ``model_or_config``: a transformers model or config with latent attention (GQLA or MLA). ``target``: a
    name, a ``Target``, or "auto" (this machine's GPU, else the measured CPU). ``s_q``: tokens decoded per
    sequence and step (2 for MTP or speculative verification). ``path`` forces a path; the plan still
    costs both. ``rope_key``: whether the grouped cache copies the RoPE key into every group ("copied",
    a stock GQA layout) or keeps it once ("shared", fewer bytes to hold and read); "auto" takes the layout
    whose grouped step is faster (ties: "copied"). ``Plan.rope_key`` is the layout taken. ``top_k``: sparse
    attention (DSA), each query attends to its top-k tokens, so the attention core costs k tokens instead of
    the context (default: the config's ``index_topk``, None for dense attention); ``index_dims``: its indexer's
    (index heads, index key dims), priced as one more part of both paths (default: the config's
    ``index_n_heads`` and ``index_head_dim``; None: not priced). ``output_absorption``: how
    the absorbed path applies W_UV ("bmm" or "folded" into o_proj); "auto" takes the cheaper.
    """
    _check_workload(s_q, batch_size, context_len, tp, path, rope_key)
    config = _config_of(model_or_config)
    dims = _latent_dims(config)
    top_k = top_k if top_k is not None else getattr(config, "index_topk", None)
    index_dims = index_dims if index_dims is not None else indexer_dims(config)
    chip = _targets.resolve(target)
    dtype = dtype_name(dtype) if dtype is not None else _default_dtype(model_or_config)
    if tp > chip.devices_per_node:
        logger.warning("tp=%d spans more than one %s node (%d devices): the all-reduce will be slower than "
                       "the interconnect figure says", tp, chip.name, chip.devices_per_node)
    peak = chip.peak(dtype)
    step = _Step(dims, s_q, batch_size, context_len, tp, "copied", DTYPE_BYTES[dtype], peak,
                 chip.memory_bandwidth, chip.interconnect_bandwidth, chip, top_k, index_dims)
    problems = feasible_paths(dims, tp)
    if rope_key == "auto":
        rope_key = _fastest_rope_key(step, problems["grouped"] is None)
    step = replace(step, rope_key=rope_key)
    feasible = [p for p, problem in problems.items() if problem is None]
    if path != "auto" and path not in feasible:
        raise ValueError(problems[path])
    if not feasible:
        raise ValueError(problems["absorbed"])  # n_g divides n_h: tp not dividing n_h fails both
    if output_absorption not in ("auto", *OUTPUT_ABSORPTIONS):
        raise ValueError(f"output_absorption must be 'auto', {', '.join(map(repr, OUTPUT_ABSORPTIONS))}, got "
                         f"{output_absorption!r}")
    output = _cheapest_output_absorption(step) if output_absorption == "auto" else output_absorption
    num_layers = getattr(config, "num_hidden_layers", 1)
    costs = {p: _path_cost(PATHS[p], step, num_layers, output) for p in feasible}
    auto = min(costs, key=lambda p: costs[p].time_s)  # ties go to absorbed: the smaller cache
    chosen = auto if path == "auto" else path
    reason = _reason(chosen, auto, costs, step, chip, path != "auto", peak / chip.memory_bandwidth)
    logger.debug("%s", reason)
    layers = tuple(LayerPlan(i, chosen, costs) for i in range(num_layers))
    forms = {p: _forms(PATHS[p], step, output) for p in feasible}
    return Plan(chosen, reason, chip, dims, num_layers, s_q, batch_size, context_len, tp, dtype, rope_key, peak,
                costs, output, layers, top_k, index_dims if top_k is not None else None, forms)


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
                    other = next(c for c in p.costs if c != p.path)
                    cells.append(f"{p.path} {p.costs[other].time_s / p.costs[p.path].time_s:.2f}x")
            rows.append([chip.name, f"{chip.ridge():.0f}", str(batch), *cells])
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)

