"""Finding the latent-attention blocks to regroup: the compiler's own detection, and what conversion reads off
each matched block besides it (the layout of its RoPE key and its output gate's projection), both settled by
evaluating the captured graph on the block's recorded call."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import capture_candidates, recorded_inputs
from ..dims import LatentDims
from ..errors import ConversionError
from ..passes.context import LayerContext
from ..passes.detect import attention_left_unchanged, detect_blocks, gate_width, probe_feeds
from ..passes.graph import ancestors, evaluate_nodes, is_linear

__all__ = ["LatentBlock", "CandidateSummary", "find_latent_blocks"]


@dataclass
class LatentBlock:
    """One detected latent-attention block and what conversion needs from the detector."""

    path: str
    layer_index: int | None  # i when the block is model.layers[i].self_attn (the compact GQLA layout), else None
    module: nn.Module
    dims: LatentDims  # n_g: the source's groups (n_h for MLA)
    scaling: float
    key_up: torch.Tensor  # W_UK^h per query head, float64 [n_h, d_n, d_c]
    value_up: torch.Tensor  # W_UV^h per query head, float64 [n_h, d_v, d_c]
    rope_order: list[int]  # source RoPE rows in rotate_half layout (identity, evens-then-odds, or any permutation)
    rope_layout: str  # "rotate_half", "interleaved", "permuted" or "none" (not rotated, or d_R = 0)
    output_gate_width: int = 0  # values the gate before o_proj holds per head and token: 0 (no gate), 1 (per head,
    # bailing_hybrid) or d_v (per channel, hy_v4, axk2); skeleton.gate_width
    output_gate_projection: str | None = None  # the Linear (path in the block) whose output rows, head by head, are
    # the gate's only source: a re-order of the heads re-orders its rows (None: no gate, or not such a Linear)

    @property
    def has_output_gate(self) -> bool:
        return self.output_gate_width > 0


@dataclass(frozen=True)
class CandidateSummary:
    """What the detector saw besides the latent blocks: how many candidate blocks it checked, and (path, why)
    of those that hold attention (or could not be traced) and so are not converted."""

    checked: int
    left_unchanged: tuple[tuple[str, str], ...] = ()
    unsupported: tuple[tuple[str, str], ...] = ()  # of those, latent attention with a piece no path handles yet


def _layer_index(model: nn.Module, module: nn.Module) -> int | None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    for index, layer in enumerate(layers):
        if getattr(layer, "self_attn", None) is module:
            return index
    return None


# Detection traces each block with torch.export (about a second per distinct block structure); converting one
# model several times (to several num_groups) reuses it while no parameter was replaced or changed in place.
_DETECTED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[list[LatentBlock], CandidateSummary]]]" = (
    weakref.WeakKeyDictionary())


def _parameter_state(model: nn.Module) -> tuple:
    return tuple((name, p.data_ptr(), p._version, tuple(p.shape)) for name, p in model.named_parameters())


def find_latent_blocks(model: nn.Module) -> tuple[list[LatentBlock], CandidateSummary]:
    """The model's latent-attention blocks as the compiler detects them; and what else the detector checked."""
    state = _parameter_state(model)
    cached = _DETECTED.get(model)
    if cached is not None and cached[0] == state:
        return cached[1]
    found = _detect_latent_blocks(model)
    _DETECTED[model] = (state, found)
    return found


def _detect_latent_blocks(model: nn.Module) -> tuple[list[LatentBlock], CandidateSummary]:
    """The compiler's own detection (:func:`~gqla_compile.passes.detect.detect_blocks`, the one ``optimize``
    runs: the same guards and the same named reasons), then what conversion reads off each matched block."""
    captured = capture_candidates(model)
    contexts = detect_blocks(dict(model.named_modules()), captured.captures)
    blocks = [_latent_block(model, context) for context in contexts if context.detection.match is not None]
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    detections = [context.detection for context in contexts]
    left = tuple(attention_left_unchanged(captured.failures, detections))
    unsupported = tuple((d.module_path, d.reason) for d in detections if d.latent_but_unsupported)
    return sorted(blocks, key=lambda b: order[b.path]), CandidateSummary(len(captured.captures), left, unsupported)


def _latent_block(model: nn.Module, context: LayerContext) -> LatentBlock:
    """A matched block (n_g and the per-group up-projections probed) as conversion reads it."""
    capture, match, parameters = context.capture, context.match, context.parameters
    module = model.get_submodule(capture.module_path)
    dims, up = match.dims, match.up_projections
    per_head = torch.arange(dims.n_h) // (dims.n_h // up.num_groups)
    layout, order = _rope_layout(capture, match, parameters)
    width = 0 if match.output_gate is None else gate_width(match.output_gate, dims)
    return LatentBlock(
        path=capture.module_path, layer_index=_layer_index(model, module), module=module, dims=dims,
        scaling=float(match.scaling), key_up=up.key.to(torch.float64)[per_head],
        value_up=up.value.to(torch.float64)[per_head], rope_order=order, rope_layout=layout,
        output_gate_width=width, output_gate_projection=_gate_projection(capture, match, parameters, width),
    )


def _rope_layout(capture, match, parameters) -> tuple[str, list[int]]:
    """Which pairs the block's RoPE rotates, read off the graph: (layout, row order into rotate_half layout).

    Two evaluations of the graph on the recorded call. (1) Every token's hidden state set to the first one's:
    the key reaching the rotation is then the same at every position, whatever the block does to it first
    (dots3 normalises its RoPE key), so a rotation keeps the norm of each rotated pair of the RoPE key's
    output across positions, and only the true pairing does. (2) One-hot RoPE rows fed where the
    down-projection's output was, at position 0 (no rotation): which output dim each of the down-projection's
    d_R rows becomes (DeepSeek-V3's interleaved RoPE de-interleaves first; a norm or gain keeps a one-hot
    one-hot). Together: the down-projection's rows of each rotated pair, in frequency order. A key equal at
    every position is not rotated (layout "none", as in Kimi's latent layers); so is a block without RoPE
    dims (d_R = 0).
    """
    dims = match.dims
    if dims.d_R == 0:
        return "none", []
    feeds = _recorded_feeds(capture, match, parameters, same_token=True)
    with torch.no_grad():
        rope, down = evaluate_nodes(capture.graph_module, [match.rope_key, match.down_projection], feeds)
    if down.shape[-1] != dims.d_c + dims.d_R or rope.shape[-1] != dims.d_R:
        raise ConversionError(f"{capture.module_path}: the down-projection does not end in the {dims.d_R} RoPE key dims")
    # a rotation changes a pair's norm by rounding only: a few units in the last place of the model's dtype
    tolerance = max(1e-4, 8 * max(torch.finfo(t.dtype).eps for t in (rope, down)))
    rope = _one_key_head(rope, down).double()  # [B, T, d_R]
    if float((rope - rope[:, :1]).abs().max()) <= min(1e-6, tolerance) * float(rope.abs().max().clamp_min(1e-30)):
        return "none", list(range(dims.d_R))
    half = dims.d_R // 2
    candidates = {  # output dims of each pair p: (order[p], order[p + half])
        "rotate_half": list(range(dims.d_R)),
        "interleaved": list(range(0, dims.d_R, 2)) + list(range(1, dims.d_R, 2)),
    }

    def pair_norms(x, order):
        x = x[..., order]
        return x[..., :half] ** 2 + x[..., half:] ** 2

    errors = {layout: float((pair_norms(rope, order) - pair_norms(rope[:, :1], order)).abs().max()
                            / pair_norms(rope, order).max().clamp_min(1e-30))
              for layout, order in candidates.items()}
    output_layout = min(errors, key=errors.get)
    if errors[output_layout] > tolerance or (dims.d_R > 2 and sorted(errors.values())[1] < tolerance):
        raise ConversionError(
            f"{capture.module_path}: could not tell which dims the RoPE rotates together (pair-norm errors {errors})"
        )
    source_of = {output: row for row, output in enumerate(_rope_rows_at_position_zero(capture, match, feeds, down))}
    order = [source_of[output] for output in candidates[output_layout]]
    layout = next((name for name, rows in candidates.items() if rows == order), "permuted")
    return layout, order


def _gate_projection(capture, match, parameters, width: int) -> str | None:
    """The Linear the block's output gate (``width`` values per head) is computed from alone, when its output
    rows are the gate's heads in order (row r reaches head r // width only, probed with one-hot rows): its
    path in the block, else None."""
    gate = match.output_gate
    if gate is None:
        return None
    linears = [n for n in ancestors(gate) | {gate} if is_linear(n)]
    weight = capture.parameter_inputs.get(linears[0].args[1].name) if len(linears) == 1 else None
    if weight is None or not weight.endswith(".weight"):
        return None
    (linear,) = linears
    feeds = _recorded_feeds(capture, match, parameters)
    with torch.no_grad():
        (rows,) = evaluate_nodes(capture.graph_module, [linear], feeds)
        if rows.shape[-1] != match.dims.n_h * width:
            return None
        zero = torch.zeros_like(rows)
        (base,) = evaluate_nodes(capture.graph_module, [gate], {**feeds, linear: zero})
        for row in range(rows.shape[-1]):
            probe = zero.clone()
            probe[..., row] = 1.0
            (moved,) = evaluate_nodes(capture.graph_module, [gate], {**feeds, linear: probe})
            heads = (moved - base).abs().reshape(*moved.shape[:2], match.dims.n_h, -1).amax(dim=(0, 1, 3))
            if int(heads.argmax()) != row // width or float(heads.sum() - heads.max()) > 0:
                return None
    return weight.removesuffix(".weight")


def _recorded_feeds(capture, match, parameters, *, same_token: bool = False) -> dict:
    """Feeds for evaluating a captured graph on its recorded call (``same_token``: every token's hidden state
    the first one's)."""
    feeds = probe_feeds(capture, match, parameters, seq=2)
    recorded = dict(zip(capture.user_placeholders, recorded_inputs(capture)))
    hidden = match.down_projection.args[0]
    hidden = ancestors(hidden) | {hidden}
    for node in list(feeds):
        if node.name in recorded:
            value = recorded[node.name]
            feeds[node] = value[:, :1].expand_as(value) if same_token and node in hidden and value.dim() == 3 else value
    return feeds


def _one_key_head(rope: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The RoPE key [B, T, d_R] out of a layout broadcast over heads ([B, heads, T, d_R] or similar)."""
    batch, seq = down.shape[0], down.shape[1]
    while rope.dim() > 3:  # every head holds the same key
        head_dim = next((i for i, size in enumerate(rope.shape[:-1]) if size not in (batch, seq)), 1)
        rope = rope.select(head_dim, 0)
    return rope


def _rope_rows_at_position_zero(capture, match, feeds: dict, down: torch.Tensor) -> list[int]:
    """For each of the down-projection's d_R RoPE rows, the RoPE key dim it becomes at position 0 (``feeds``:
    the recorded call's, ``down``: the down-projection's output there, whose place the probes take)."""
    dims = match.dims
    with torch.no_grad():
        image = []
        for row in range(dims.d_R):
            probe = torch.zeros_like(down)
            probe[:, 0, dims.d_c + row] = 1.0  # the first recorded token sits at position 0
            (rope,) = evaluate_nodes(capture.graph_module, [match.rope_key], {**feeds, match.down_projection: probe})
            out = _one_key_head(rope, down)[0, 0].abs()
            if float(out.max()) <= 0 or float(out.sum() - out.max()) > 1e-6 * float(out.max()):
                raise ConversionError(f"{capture.module_path}: the block mixes the RoPE key's dims before rotating "
                                      "them; regrouping cannot carry that")
            image.append(int(out.argmax()))
    if sorted(image) != list(range(dims.d_R)):
        raise ConversionError(f"{capture.module_path}: the RoPE key's dims are not a permutation of the "
                              f"down-projection's RoPE rows ({image})")
    return image
