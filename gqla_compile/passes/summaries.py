"""What each pass did, as one small frozen dataclass per pass: the pass record keeps it and the report reads
its attributes (``dataclasses.asdict`` gives the plain data where JSON is written).

Every summary answers the two questions the report asks of any pass, so the report loops over the records
without knowing which pass made which: the weights it folded (:meth:`PassSummary.folded`) and how it absorbed
the up-projections into the query or the output (:meth:`PassSummary.absorption`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PassSummary:
    """Base of every pass's summary."""

    def folded(self) -> dict[str, list[int]]:
        """Weights folded at compile time: name -> shape (none by default)."""
        return {}

    def absorption(self) -> dict[str, str]:
        """How the query and output absorptions were done (none by default)."""
        return {}


@dataclass(frozen=True)
class NoMatchSummary(PassSummary):
    """detect, on a layer that holds no latent attention: the reason."""

    matched: int = 0
    reason: str = ""


@dataclass(frozen=True)
class SelectionSummary:
    """The sparse piece of a match: k (None: chosen by another block) and where the selection comes from."""

    top_k: int | None
    selection: str
    index_key_dims: int | None


@dataclass(frozen=True)
class MatchSummary(PassSummary):
    """detect, on a matched layer: what was found, in plain data."""

    module: str
    attention: str
    dims: dict[str, Any]
    scaling: float
    q_lora: bool
    matched_nodes: int
    weights: dict[str, str | None]  # down_projection, up_projection, output_projection -> parameter name
    ops: dict[str, int]
    sparse: SelectionSummary | None  # the token selection; None: dense attention
    matched: int = 1


@dataclass(frozen=True)
class SplitSummary(PassSummary):
    """split: which of the captured nodes the latent projection graph no longer computes."""

    removed: dict[str, bool] = field(default_factory=dict)  # up_projection, attention, output_projection


@dataclass(frozen=True)
class AbsorbSummary(PassSummary):
    """absorb: the absorbed path's query and output absorption, and the weights the core folds in."""

    query_absorption: str
    output_absorption: str
    folded_weights: dict[str, list[int]]

    def folded(self) -> dict[str, list[int]]:
        return dict(self.folded_weights)

    def absorption(self) -> dict[str, str]:
        return {"query_absorption": self.query_absorption, "output_absorption": self.output_absorption}


@dataclass(frozen=True)
class ExpandSummary(PassSummary):
    """expand: the grouped path's stacked up-projection, its group count and RoPE-key layout."""

    folded_weights: dict[str, list[int]]
    n_g: int
    rope_key: str

    def folded(self) -> dict[str, list[int]]:
        return dict(self.folded_weights)


@dataclass(frozen=True)
class ShardSummary(PassSummary):
    """shard: the rank's part of the layer, what was sharded and what stayed replicated."""

    tp: int
    rank: int
    backend: str
    path: str
    heads: list[int]
    groups: list[int] | None
    query_projection: str
    sharded_weights: dict[str, list[int]]
    replicated: dict[str, str]
    collective: str
    o_proj_bias: str
    cache_elements_per_token_per_rank: int
    cache: str
