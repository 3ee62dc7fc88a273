"""The data types of a latent-attention match: what detection found, or why it found nothing.

The bottom of the passes: the skeleton matcher (skeleton.py), the token selection (selection.py), the probes
(probe.py), the passes that rewrite a match and the paths all read these types, and this module imports
nothing of the package but ``dims``, so any of them can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import fx

from ..dims import LatentDims

__all__ = [
    "FailedMatch", "NO_ATTENTION", "EAGER_ATTENTION_SHAPE", "VALUES_NOT_PROJECTED", "NO_DOWN_PROJECTION",
    "KEYS_NOT_FROM_LATENT", "OUTPUT_NOT_PROJECTED", "UP_PROJECTION_BIAS", "OUTPUT_GATE_SHAPE",
    "ATTENTION_SINK_SHAPE", "LEARNED_TOKEN_SELECTION", "INDEX_KEYS_UNCLEAR", "UNSUPPORTED_LATENT_PIECES",
    "rope_key_count", "shape_mismatch", "LatentAttentionMatch", "Detection", "TokenSelectionMatch",
    "UpProjections",
]


class HasParameterInputs(Protocol):
    """What :meth:`LatentAttentionMatch.weight_name` reads of a capture (``capture.CapturedAttention``)."""

    parameter_inputs: dict[str, str]  # placeholder name -> parameter name inside the module


class FailedMatch(str):
    """Why the skeleton did not match (at one attention site, or in the whole graph), as a sentence.

    Like Inductor's ``FailedMatch``: every way matching can fail returns one of these instead of None, so
    the reason reaches the warning, ``OptimizationState.skipped`` and the report.
    """


# The ways the skeleton can fail to match, one name each.
NO_ATTENTION = FailedMatch("no attention in the graph (neither scaled_dot_product_attention nor "
                           "matmul -> softmax -> matmul)")
EAGER_ATTENTION_SHAPE = FailedMatch("a softmax that is not eager attention (matmul(q, k^T) [scale] [mask] -> softmax "
                                    "-> matmul(p, v))")
VALUES_NOT_PROJECTED = FailedMatch("the attention's values do not come from a linear on a weight (no latent "
                                   "up-projection)")
NO_DOWN_PROJECTION = FailedMatch("no linear above the up-projection's input (no latent down-projection)")
KEYS_NOT_FROM_LATENT = FailedMatch("keys are not expanded from the same latent as the values")
OUTPUT_NOT_PROJECTED = FailedMatch("the attention output does not flow into one linear (no output projection)")
UP_PROJECTION_BIAS = FailedMatch("the latent up-projection has a bias; absorbing it is not supported")
OUTPUT_GATE_SHAPE = FailedMatch("a product between the attention and the output projection that is not a gate "
                                "[batch, seq, heads, 1 or d_v] computed without the attention")
ATTENTION_SINK_SHAPE = FailedMatch("a score column joined before the softmax that is not a learned attention sink (a "
                                   "parameter of one logit per query head, dropped after the softmax)")
LEARNED_TOKEN_SELECTION = FailedMatch("the attention's mask is computed by its own projections in a form other than "
                                      "top-k token indices scattered into the mask (a learned token selection the "
                                      "sparse piece does not recognise)")
INDEX_KEYS_UNCLEAR = FailedMatch("a top-k token selection whose index keys (the [batch, seq, dims] tensor an "
                                 "indexer caches) are not one tensor")

#: Failures that mean "latent attention, with a piece the paths do not rewrite", not "no latent attention".
UNSUPPORTED_LATENT_PIECES = frozenset({LEARNED_TOKEN_SELECTION, INDEX_KEYS_UNCLEAR, UP_PROJECTION_BIAS})


def rope_key_count(count: int) -> FailedMatch:
    """The skeleton found ``count`` RoPE-key candidates where it needs exactly one."""
    return FailedMatch(f"{count} candidate RoPE keys (tensors reaching the keys from the down-projection without the "
                       "up-projection); latent attention has exactly one")


def shape_mismatch(detail: str) -> FailedMatch:
    """A match whose shapes do not fit latent attention (``detail`` says which)."""
    return FailedMatch(f"shapes do not fit latent attention: {detail}")


@dataclass
class LatentAttentionMatch:
    """Where latent attention sits in one captured graph, with its dims and weights' placeholder names.

    ``dims.n_g`` is the up-projection's row count until probing (:func:`detect_layer`) settles it and
    attaches the per-group up-projections as ``up_projections``.
    """

    module_path: str
    attention_kind: str  # "sdpa" or "eager"
    query: fx.Node  # attention's query input [B, n_h, T, d_n + d_R]
    latent: fx.Node  # input of the up-projection (normalised latent)
    rope_key: fx.Node  # the shared RoPE key, last node before it merges with the expanded keys
    key: fx.Node
    value: fx.Node
    attention_output: fx.Node  # [B, n_h, T, d_v]
    up_projection: fx.Node  # linear(latent, W_UKV)
    down_projection: fx.Node  # linear(x, W_DKV)
    output_projection: fx.Node  # linear(., W_O[, b_O])
    scaling: float
    dims: LatentDims
    q_lora: bool
    matched_nodes: int = 0
    up_projections: UpProjections | None = None  # set by probing: W_UK, W_UV per group
    output_gate: fx.Node | None = None  # optional gate (see gate_width) multiplied before o_proj
    attention_sink: fx.Node | None = None  # optional learned sink logits [n_h] (a parameter placeholder)
    selection: TokenSelectionMatch | None = None  # optional top-k token selection (sparse attention)

    def weight_name(self, capture: HasParameterInputs, linear: fx.Node, index: int = 1) -> str | None:
        """Parameter name behind a linear's weight (index 1) or bias (index 2) placeholder."""
        if len(linear.args) <= index or linear.args[index] is None:
            return None
        return capture.parameter_inputs.get(linear.args[index].name)


@dataclass
class Detection:
    """What detection found in one layer: the match, or every reason it did not match."""

    module_path: str
    match: LatentAttentionMatch | None
    failures: list[FailedMatch] = field(default_factory=list)

    @property
    def has_attention(self) -> bool:
        """Whether the graph holds an attention at all (a block with attention that did not match is news)."""
        return self.match is not None or any(f != NO_ATTENTION for f in self.failures)

    @property
    def latent_but_unsupported(self) -> bool:
        """Latent attention was recognised (at one of the attention sites) but holds a piece no path rewrites yet
        (not "no latent attention")."""
        return self.match is None and bool(set(self.failures) & UNSUPPORTED_LATENT_PIECES)

    @property
    def reason(self) -> str:
        """One sentence for the warning, ``skipped`` and the report (empty for a match)."""
        if self.match is not None:
            return ""
        unique = list(dict.fromkeys(self.failures))
        return "; ".join(unique) if unique else str(NO_ATTENTION)


@dataclass
class TokenSelectionMatch:
    """The optional sparse piece: top-k token indices scattered into the attention's mask (DSA).

    The indices come from a ``topk`` over scores the block computes with its own projections (an indexer,
    kept unchanged: it stays a graph) or from a block input (a selection an earlier block made and passes on).
    (Named apart from ``runtime.TokenSelection``, the module that runs a selection once installed.)
    ``index_key`` is the indexer's per-token key [B, T, d_I]: what the family caches (transformers'
    ``cache.update_indexer``), so that the selection scores every cached token.
    """

    indices: fx.Node  # the indices as scattered into the mask (before any clamp), [B, T, k]
    source: fx.Node  # the topk's index output, the stateful child's call, or the block input they come from
    top_k: int | None  # k of the topk, or the stateful child's output width (None: unknown, a block input)
    topk: fx.Node | None
    index_key: fx.Node | None
    returned: dict[int, fx.Node] = field(default_factory=dict)  # block output position -> indices it returns
    replaces_mask: bool = False  # the block's attention mask reaches the attention only through the selection
    stateful: bool = False  # the indices come from a child module that reads the cache (run as the family wrote it)

    @property
    def shared(self) -> bool:
        """Whether the indices are a block input (another block's selection) rather than computed here."""
        return self.source.op == "placeholder"


@dataclass
class UpProjections:
    """Per-group up-projections read off the graph: W_UK [n_g, d_n, d_c] and W_UV [n_g, d_v, d_c]."""

    key: torch.Tensor
    value: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.key.shape[0]
