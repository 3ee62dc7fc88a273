"""Detection of latent attention, the entry module: a model's blocks (:func:`detect_blocks`, what ``optimize``
and ``convert`` both call), one layer's complete detection and the detect pass.

Detection is split along its seams; the names other modules use are all importable from here:

- match.py: the data types (``FailedMatch`` and its reasons, ``LatentAttentionMatch``, ``Detection``,
  ``TokenSelectionMatch``, ``UpProjections``);
- skeleton.py: the skeleton matcher, by dataflow alone (:func:`find_latent_attention`);
- selection.py: the optional top-k token selection (sparse attention) that masks the attention;
- probe.py: evaluating the graph to settle n_g and the per-group up-projections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import fx, nn

from ..capture import CapturedAttention, TraceFailure
from ..capture_stateful import retrace_with_stateful_children
from ..errors import ShapeMismatchError
from .context import LayerContext
from .graph import op_histogram, tensor_meta
from .manager import PassManager
from .summaries import MatchSummary, NoMatchSummary, SelectionSummary
from .match import (  # noqa: F401  re-exported: the names detection's users import from here
    ATTENTION_SINK_SHAPE,
    EAGER_ATTENTION_SHAPE,
    INDEX_KEYS_UNCLEAR,
    KEYS_NOT_FROM_LATENT,
    LEARNED_TOKEN_SELECTION,
    NO_ATTENTION,
    NO_DOWN_PROJECTION,
    OUTPUT_GATE_SHAPE,
    OUTPUT_NOT_PROJECTED,
    UNSUPPORTED_LATENT_PIECES,
    UP_PROJECTION_BIAS,
    VALUES_NOT_PROJECTED,
    Detection,
    FailedMatch,
    LatentAttentionMatch,
    TokenSelectionMatch,
    UpProjections,
    shape_mismatch,
)
from .probe import batch_and_seq_symbols, probe_feeds, probe_up_projections  # noqa: F401  re-exported
from .skeleton import find_latent_attention, gate_width  # noqa: F401  re-exported


def detect_blocks(modules: Mapping[str, nn.Module], captures: Sequence[CapturedAttention],
                  manager: PassManager | None = None) -> list[LayerContext]:
    """Detection of every captured block of a model, one :class:`LayerContext` each, in ``captures``' order.

    The one entry point of ``optimize`` and ``convert``, so that both apply the same guards and name the same
    reasons. Each block runs the detect pass (match, probing, and its guards: a biased up-projection is a named
    failure); then a block whose token selection was not recognised and that holds a child module reading the
    cache (an indexer with state of its own: its keys, the cache length) is traced again with that child as one
    opaque call and detected again (layers of one structure share the new trace). ``manager`` keeps the detect
    passes' records (optimize's report); without one they are not kept.
    """
    manager = manager if manager is not None else PassManager()
    contexts = [_detect(manager, LayerContext.of(modules[c.module_path], c)) for c in captures]
    traced: dict[tuple, CapturedAttention | None] = {}
    result = []
    for context in contexts:
        if context.detection.match is None and LEARNED_TOKEN_SELECTION in context.detection.failures:
            module = modules[context.module_path]
            capture = retrace_with_stateful_children(context.capture, module, traced)
            if capture is not None:
                context = _detect(manager, LayerContext.of(module, capture))
        result.append(context)
    return result


def _detect(manager: PassManager, context: LayerContext) -> LayerContext:
    """Detection, probing included, as the first pass of the layer: fills ``context.detection``."""
    manager.run([DetectLatentAttention(context)], context.capture.graph_module, context.module_path)
    return context


def attention_left_unchanged(failures: list[TraceFailure], detections: list[Detection]) -> list[tuple[str, str]]:
    """(path, why) of the blocks a rewrite or conversion leaves as they were although they hold attention (or
    could not be traced, so may): what its partial-rewrite warning names."""
    return [(f.module_path, f.reason) for f in failures] + [
        (d.module_path, d.reason) for d in detections if d.match is None and d.has_attention]


def detect_latent_attention(capture: CapturedAttention) -> LatentAttentionMatch | None:
    """Find the latent-attention skeleton in a captured graph; None when the graph holds none.

    The match's n_g is provisional (the up-projection's row count); :func:`detect_layer` probes it.
    """
    return find_latent_attention(capture).match


def detect_layer(capture: CapturedAttention, parameters: dict[str, torch.Tensor]) -> Detection:
    """Detection of one layer, complete: the match with n_g and the per-group up-projections probed from
    this layer's own ``parameters`` (layers of one structure share the graph, never the weights)."""
    detection = find_latent_attention(capture)
    if detection.match is None:
        return detection
    try:
        up = probe_up_projections(capture, detection.match, parameters)
    except ShapeMismatchError as exc:
        failure = UP_PROJECTION_BIAS if "has a bias" in str(exc) else shape_mismatch(str(exc))
        return Detection(capture.module_path, None, [failure])
    match = replace(detection.match, dims=replace(detection.match.dims, n_g=up.num_groups), up_projections=up)
    return Detection(capture.module_path, match)


def describe(match: LatentAttentionMatch, capture: CapturedAttention) -> MatchSummary:
    """Plain-data summary of a match, for the pass record and the report."""
    return MatchSummary(
        module=match.module_path,
        attention=match.attention_kind,
        dims=match.dims.as_dict(),
        scaling=match.scaling,
        q_lora=match.q_lora,
        matched_nodes=match.matched_nodes,
        weights={
            "down_projection": match.weight_name(capture, match.down_projection),
            "up_projection": match.weight_name(capture, match.up_projection),
            "output_projection": match.weight_name(capture, match.output_projection),
        },
        ops=dict(op_histogram(capture.graph_module)),
        sparse=describe_selection(match.selection),
    )


def describe_selection(selection: TokenSelectionMatch | None) -> SelectionSummary | None:
    """The sparse piece in plain data (None: dense attention): k and where the selection comes from."""
    if selection is None:
        return None
    return SelectionSummary(
        top_k=selection.top_k,
        selection=("a block input (another block's top-k)" if selection.shared
                   else "an indexer module that reads the cache, called as the family wrote it"
                   if selection.stateful else "indexer top-k"),
        index_key_dims=None if selection.index_key is None else int(tensor_meta(selection.index_key).shape[-1]))


class DetectLatentAttention:
    """Analysis pass: detection of one layer (match and probing) into its :class:`LayerContext`; the graph is
    returned unchanged."""

    name = "detect"

    def __init__(self, context: LayerContext):
        self.context = context

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.context.detection = detect_layer(self.context.capture, self.context.parameters)
        return gm

    def summary(self) -> MatchSummary | NoMatchSummary:
        detection = self.context.detection
        if detection is None or detection.match is None:
            return NoMatchSummary(reason=detection.reason if detection else "")
        return describe(detection.match, self.context.capture)
