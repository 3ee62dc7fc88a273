"""The roofline price of one path's decode step, per layer and tensor-parallel rank, in parts (see cost_model.py).

Each part costs max(bytes / bandwidth, FLOPs / peak) over the measured efficiency of the kernel that runs it
(:meth:`Step.part`, the one place that is decided); the path supplies every term (its cache per rank, the head
dims its core reads, its projections' weights, its attention-kernel class), so this module knows no path by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .cost_terms import Matmul
from .dims import LatentDims
from .forms import ComputeForm
from .paths import DecodePath
from .targets import KERNEL_GEMV, Target


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
class Step:
    """The workload of one decode step on one rank, and the roofline it runs on."""

    dims: LatentDims
    s_q: int
    batch_size: int
    context_len: int
    tp: int
    rope_key: str
    dtype: str  # the dtype's name (targets.DTYPE_BYTES)
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


def projections(step: Step, matmuls: Iterable[Matmul]) -> PartCost:
    elements = flops = 0.0
    for m in matmuls:
        share = step.tp if m.sharded else 1
        elements += m.weight_elements / share
        flops += step.tokens * m.flops_per_token / share
    return step.part("projections", elements, flops, kernel=(KERNEL_GEMV, step.tokens))


def _attention_core(path: DecodePath, step: Step) -> PartCost:
    """Read the cache over the context; scores, softmax and values (DESIGN.md section 2 table)."""
    flops_per_token = 2 * (step.dims.n_h // step.tp) * step.s_q * path.attention_head_dims(step.dims)
    contexts = step.batch_size * path.attended_tokens(step.context_len, step.top_k)
    rank_elements = path.rank_cache_elements(step.dims, step.tp, rope_key=step.rope_key)
    rows = path.query_rows_per_cached_head(path.rank_dims(step.dims, step.tp)) * step.s_q
    return step.part("attention_core", contexts * rank_elements, contexts * flops_per_token,
                     kernel=(path.attention_kernel(step.rope_key, multi_token=step.s_q > 1), rows))


def _indexer(step: Step) -> PartCost:
    """A sparse step's indexer (DSA): every new token scores the whole context's cached index keys (one head
    of d_I per token, read once per step) with its n_I index heads. Its own projections and the top-k are
    not counted."""
    heads, dims = step.index_dims
    return step.part("indexer", step.batch_size * step.context_len * dims,
                     2 * step.tokens * heads * dims * step.context_len)


def _all_reduce(step: Step) -> PartCost:
    """Ring all-reduce of o_proj's output: 2 (P - 1) / P of the activations cross each rank's link."""
    p = step.tp
    return step.part("all_reduce", 2 * (p - 1) / p * step.tokens * step.dims.hidden_size, 0.0, over_link=True)


def path_cost(path: DecodePath, step: Step, num_layers: int, output: str) -> PathCost:
    rank_elements = path.rank_cache_elements(step.dims, step.tp, rope_key=step.rope_key)
    parts = (
        _attention_core(path, step),
        step.part("cache_write", step.tokens * rank_elements, 0.0),
        projections(step, path.projection_matmuls(step.dims, output_absorption=output)),
        _all_reduce(step),
    ) + ((_indexer(step),) if step.top_k is not None and step.index_dims is not None else ())
    whole_elements = path.cache_elements(step.dims, rope_key=step.rope_key)
    return PathCost(path.name, parts, num_layers, whole_elements * step.dtype_bytes,
                    rank_elements * step.dtype_bytes)


def call_time_s(form: ComputeForm, step: Step, new: int, prefix: int) -> float:
    """One layer's attention for one call of ``new`` tokens after ``prefix`` cached ones in ``form``, for the
    step's batch on one rank (the form's terms are the rank's): max(bytes / bandwidth, FLOPs / peak)."""
    keys = prefix + new
    part = step.part("call", step.batch_size * keys * form.elements_per_key,
                     step.batch_size * form.flops(new, keys))
    return part.time_s


def priced_forms(path: DecodePath, step: Step, output: str) -> dict[str, Any]:
    """A path's compute forms for the plan: the description, each call kind priced in every form."""
    choice = path.compute_forms(path.rank_dims(step.dims, step.tp), output_absorption=output)
    data = choice.describe(s_q=step.s_q, context_len=step.context_len)
    for call in data["calls"]:
        call["time_s"] = {form.name: call_time_s(form, step, call["new_tokens"], call["prefix"])
                          for form in choice.forms}
    return data
