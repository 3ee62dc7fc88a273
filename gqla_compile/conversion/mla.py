"""TransGQLA for latent-attention checkpoints: MLA (DeepSeek-V2/V3 style, n_g = n_h) or GQLA -> GQLA with fewer groups.

The latent c, the shared RoPE key and everything outside attention stay as they are; only the up-projections
are regrouped. Per layer, with C = E[c c^T] (float64, over calibration tokens, optionally weighted) and the
heads of one new group G stacked, M = [W_UK^h]_{h in G} (m d_n x d_c):

- whiten: X_h = W_UK^h C^{1/2}; stack X = [X_h]; SVD X = U S V^T; keep the top d_n right singular vectors V.
- shared up-projection of the group: W_UK^G = diag(sigma) V^T C^{-1/2} (sigma = S / sqrt(m): the group's key has
  the scale of one head's key);
- head map A_h = X_h V diag(1 / sigma) (d_n x d_n), so that A_h W_UK^G = W_UK^h C^{1/2} V V^T C^{-1/2}, the best
  approximation of W_UK^h on the calibration latents (Eckart-Young in the C-metric). The head's score
  q_h . A_h W_UK^G c = (A_h^T q_h) . W_UK^G c, so A_h^T is folded into q_h's no-RoPE rows.
- values likewise (d_v directions), with B_h folded into o_proj's columns of head h.

C is damped (C + 1e-6 mean(diag C) I) and C^{1/2}, C^{-1/2} come from the same eigendecomposition, so they are
exact inverses: with n_g = n_h (m = 1, rank d_n) the conversion reproduces the model up to rounding.

Options:

- ``score_aware``: weight the PCA by what the heads do with keys and values: each head's key rows by the
  square root of its queries' second moment E[q_h q_h^T] (so the kept subspace preserves the scores
  q . k rather than the keys), each head's value rows by (W_O,h^T W_O,h)^{1/2} (so it preserves the output
  projection of the values). A_h and B_h stay the least-squares maps (they do not depend on a left weight).
- ``grouping="similarity"``: heads assigned to equal-size groups by how well their (whitened) key and value
  row spaces share one d_n (d_v) dim basis: greedy construction, then pairwise swaps, started from both
  the greedy and the neighbour grouping, keeping the one of least calibration residual (so it is never worse
  than neighbour grouping on the calibration data). The permutation is applied to q head blocks and o_proj
  column blocks.
- ``weighting="loss"``: each calibration token's latent is weighted by the original model's next-token loss
  at that position (normalised to mean 1 per batch): the latents of positions the model finds hard count
  more (the last position, which has no target, gets weight 1).

Finding the blocks: the compiler's detector (``capture_candidates`` + ``find_latent_attention`` +
``probe_up_projections``) finds every latent-attention block wherever it sits (several per layer, hybrid
models' latent layers), its dims, its softmax scale and (by probing) the per-head up-projections W_UK^h,
W_UV^h; the layout of the RoPE key is settled by evaluating the captured graph (rotate_half, interleaved
pairs, or none: not rotated). Blocks with attention that it cannot trace or match are left as they are, with
a ``PartialRewriteWarning`` naming them and why. Once the detector has confirmed a block, its q / kv_a / o
weights are read by the DeepSeek names that every transformers MLA family shares (``q_proj`` or
``q_a_proj``/``q_a_layernorm``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``o_proj``).

The result (``output=``):

- ``"family"`` (default): a copy of the source, same class, config and modules; only each block's query,
  ``kv_b_proj`` (each group's up-projection repeated for the heads of the group) and ``o_proj`` change, so
  every other weight (experts, routers, norms, scales, lm_head) is bit-identical and the checkpoint loads
  in stock transformers; ``config.gqla_conversion`` records the conversion.
- ``"gqla"``: a GqlaForCausalLM (``kv_b_proj`` once per group, RoPE rows in rotate_half order), only where it
  reproduces the family-form result (checked on a probe input); otherwise a ConversionError names what the
  compact form cannot hold (MoE weights, several blocks per layer, unrotated RoPE dims, config fields such
  as MiniCPM3's scales).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration_gqla import GqlaConfig
from ..dims import LatentDims
from ..errors import ConversionError, PartialRewriteWarning
from ..verification import relative_error, reproduction_tolerance
from ..passes.graph import ancestors, evaluate_nodes, is_linear
from .calibration import DEFAULT_BATCH_SIZE, CalibrationInput, _batches, prepare_calibration
from .common import model_wide_config_fields

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPINGS",
    "WEIGHTINGS",
    "LatentBlock",
    "find_latent_blocks",
    "collect_latent_statistics",
    "group_basis",
    "similarity_grouping",
    "convert_mla",
]

GROUPINGS = ("neighbour", "similarity")
WEIGHTINGS = (None, "loss")
MOMENT_DAMPING = 1e-6
_SWAP_PASSES = 4


# --- detection ----------------------------------------------------------------------------------------------


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
    # bailing_hybrid) or d_v (per channel, hy_v4, axk2); detect.gate_width
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
    from ..capture import capture_candidates
    from ..passes.detect import attention_left_unchanged, detect_blocks

    captured = capture_candidates(model)
    contexts = detect_blocks(dict(model.named_modules()), captured.captures)
    blocks = [_latent_block(model, context) for context in contexts if context.detection.match is not None]
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    detections = [context.detection for context in contexts]
    left = tuple(attention_left_unchanged(captured.failures, detections))
    unsupported = tuple((d.module_path, d.reason) for d in detections if d.latent_but_unsupported)
    return sorted(blocks, key=lambda b: order[b.path]), CandidateSummary(len(captured.captures), left, unsupported)


def _latent_block(model: nn.Module, context) -> LatentBlock:
    """A matched block (n_g and the per-group up-projections probed) as conversion reads it."""
    from ..passes.detect import gate_width

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
    from ..capture import recorded_inputs
    from ..passes.detect import probe_feeds

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


# --- calibration statistics ---------------------------------------------------------------------------------


@dataclass
class LatentStatistics:
    latent: list[torch.Tensor]  # per layer E_w[c c^T] [d_c, d_c] float64
    query: list[torch.Tensor] | None  # per layer E_w[q^n_h q^n_h^T] [n_h, d_n, d_n] (score_aware only)
    tokens: int
    weight_sum: float


def _query_linear(attention: nn.Module) -> nn.Linear:
    return attention.q_proj if getattr(attention, "q_proj", None) is not None else attention.q_b_proj


@torch.no_grad()
def collect_latent_statistics(
    model: nn.Module,
    blocks: Sequence[LatentBlock],
    sequences: Sequence[torch.Tensor],
    *,
    weighting: str | None = None,
    queries: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> LatentStatistics:
    """Weighted second moments of the latents (and of the no-RoPE queries) of every block, float64.

    Hooks on each block's latent (the output of ``kv_a_layernorm``, or the first d_c outputs of
    ``kv_a_proj_with_mqa`` when there is no norm) keep the current batch; after the forward the token weights
    (padding mask, times the next-token loss with ``weighting="loss"``) are known and the moments are summed.
    """
    stash: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keep(key, width=None, view=None):
        def hook(_module, _args, output):
            out = output[..., :width] if width is not None else output
            if view is not None:
                out = out.reshape(*out.shape[:-1], view[0], view[1])[..., : view[2]]
            stash[key] = out.detach().to("cpu", torch.float64)
        return hook

    for i, block in enumerate(blocks):
        attn, d = block.module, block.dims
        norm = getattr(attn, "kv_a_layernorm", None)
        if isinstance(norm, nn.Module):
            handles.append(norm.register_forward_hook(keep((i, "c"))))
        else:
            handles.append(attn.kv_a_proj_with_mqa.register_forward_hook(keep((i, "c"), width=d.d_c)))
        if queries:
            handles.append(_query_linear(attn).register_forward_hook(keep((i, "q"), view=(d.n_h, d.d_qk, d.d_n))))

    latent = [torch.zeros(b.dims.d_c, b.dims.d_c, dtype=torch.float64) for b in blocks]
    query = [torch.zeros(b.dims.n_h, b.dims.d_n, b.dims.d_n, dtype=torch.float64) for b in blocks] if queries else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens, weight_sum = 0, 0.0
    n_batches = -(-len(sequences) // batch_size)
    try:
        for ids, mask in tqdm(_batches(sequences, batch_size), total=n_batches, desc="calibration", unit="batch",
                              disable=not progress):
            stash.clear()
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            weights = mask.to(torch.float64)
            if weighting == "loss":
                weights = weights * _loss_weights(out.logits, ids.to(out.logits.device), mask)
            flat = weights.reshape(-1)
            tokens += int(mask.sum())
            weight_sum += float(flat.sum())
            for i in range(len(blocks)):
                c = stash[(i, "c")].reshape(-1, blocks[i].dims.d_c)
                latent[i] += (c * flat[:, None]).T @ c
                if queries:
                    q = stash[(i, "q")].reshape(flat.shape[0], blocks[i].dims.n_h, -1)
                    query[i] += torch.einsum("t,thd,the->hde", flat, q, q)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    scale = 1.0 / max(weight_sum, 1e-300)
    return LatentStatistics(
        latent=[m * scale for m in latent], query=[m * scale for m in query] if queries else None,
        tokens=tokens, weight_sum=weight_sum,
    )


def _loss_weights(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per position, the next-token loss normalised to mean 1 over the batch's scored positions (float64, CPU).

    Positions with no next token (the last real one of each row) get weight 1.
    """
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1).to("cpu", torch.float64)
    scored = (mask[:, 1:] * mask[:, :-1]).to(torch.float64)
    mean = float((nll * scored).sum() / scored.sum().clamp_min(1))
    weights = torch.ones(ids.shape, dtype=torch.float64)
    if mean > 0:
        weights[:, :-1] = torch.where(scored.bool(), nll / mean, torch.ones_like(nll))
    return weights


# --- the per-group PCA ----------------------------------------------------------------------------------------


def _sqrt_pair(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C^{1/2} and C^{-1/2} of the damped C (one eigendecomposition, so they are exact inverses)."""
    ridge = MOMENT_DAMPING * max(float(moment.diagonal().mean()), 1e-300)
    eigvals, eigvecs = torch.linalg.eigh(moment + ridge * torch.eye(moment.shape[0], dtype=moment.dtype))
    eigvals = eigvals.clamp_min(ridge)
    return (eigvecs * eigvals.sqrt()) @ eigvecs.T, (eigvecs * eigvals.rsqrt()) @ eigvecs.T


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a (batch of) PSD matrices, damped like C."""
    ridge = MOMENT_DAMPING * matrix.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    eigvals, eigvecs = torch.linalg.eigh(matrix + ridge[..., None, None] * eye)
    return (eigvecs * eigvals.clamp_min(0).sqrt()[..., None, :]) @ eigvecs.transpose(-1, -2)


def group_basis(
    whitened: torch.Tensor, inv_sqrt: torch.Tensor, left: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Shared up-projection and head maps of one group.

    Args:
        whitened: X_h = W^h C^{1/2} of the group's heads [m, d, d_c].
        inv_sqrt: C^{-1/2} [d_c, d_c].
        left: optional per-head left weights L_h [m, d, d] (the PCA then keeps what L_h X_h needs most).

    Returns W^G [d, d_c], the head maps A [m, d, d] with A_h W^G = X_h V V^T C^{-1/2}, and the share of the
    (weighted) energy kept.
    """
    m, d, d_c = whitened.shape
    target = whitened if left is None else left @ whitened
    _, s, vh = torch.linalg.svd(target.reshape(m * d, d_c), full_matrices=False)
    k = min(d, vh.shape[0])
    v = vh[:k].T  # [d_c, k]
    s = s[:k]
    sigma = torch.where(s > 1e-12 * s[0].clamp_min(1e-300), s / math.sqrt(m), torch.ones_like(s))
    basis = torch.zeros(d, d_c, dtype=whitened.dtype)
    maps = torch.zeros(m, d, d, dtype=whitened.dtype)
    basis[:k] = sigma[:, None] * (v.T @ inv_sqrt)
    maps[:, :, :k] = (whitened @ v) / sigma
    total = float(target.square().sum())
    kept = float(s.square().sum()) / total if total > 0 else 1.0
    return basis, maps, kept


def _weighted(whitened: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
    """Per head L_h X_h [n, d, d_c]: what the grouping's PCA has to keep."""
    return whitened if left is None else left @ whitened


def _residual(stacked: torch.Tensor, d: int) -> float:
    """Energy of ``stacked`` [rows, d_c] outside its top-d principal directions.

    The eigenvalues come from the smaller of the two Gram matrices (rows x rows or d_c x d_c): their
    non-zero eigenvalues are the same, and a group of a few heads has far fewer rows than latent dims.
    """
    gram = stacked @ stacked.T if stacked.shape[0] < stacked.shape[1] else stacked.T @ stacked
    eigvals = torch.linalg.eigvalsh(gram)
    return float(eigvals[:-d].clamp_min(0).sum()) if d < eigvals.numel() else 0.0


class _GroupingCost:
    """Calibration residual of a grouping: per kind (keys, values), the energy PCA loses, relative to the total."""

    def __init__(self, targets: Sequence[torch.Tensor], ranks: Sequence[int]):
        self.targets, self.ranks = targets, ranks
        self.energies = [t.square().sum((1, 2)) for t in targets]  # per head
        self.totals = [float(e.sum()) or 1.0 for e in self.energies]
        self.cache: dict[frozenset, float] = {}

    def group(self, heads) -> float:
        key = frozenset(heads)
        if key not in self.cache:
            index = torch.tensor(sorted(key))
            self.cache[key] = sum(_residual(t[index].reshape(-1, t.shape[-1]), d) / total
                                  for t, d, total in zip(self.targets, self.ranks, self.totals))
        return self.cache[key]

    def total(self, groups) -> float:
        return sum(self.group(g) for g in groups)


def similarity_grouping(targets: Sequence[torch.Tensor], ranks: Sequence[int], num_groups: int) -> tuple[list[list[int]], float, float]:
    """Equal-size groups of heads whose subspaces share one basis best: (groups, cost, neighbour cost).

    ``targets``: per kind (keys, values) the heads' weighted whitened up-projections [n_h, d, d_c]; ``ranks``:
    the basis size of each kind. Greedy construction (seed: the unassigned head of most energy; then the head
    that adds the least residual), then pairwise swaps between groups while they lower the residual, started
    from the greedy and from the neighbour grouping; the better result is kept.
    """
    n_h = targets[0].shape[0]
    m = n_h // num_groups
    cost = _GroupingCost(targets, ranks)
    neighbour = [list(range(g * m, (g + 1) * m)) for g in range(num_groups)]
    energy = sum(e / t for e, t in zip(cost.energies, cost.totals))
    unassigned = set(range(n_h))
    greedy = []
    for _ in range(num_groups):
        group = [max(unassigned, key=lambda h: (float(energy[h]), -h))]
        unassigned.discard(group[0])
        while len(group) < m:
            best = min(unassigned, key=lambda h: (cost.group(group + [h]), h))
            group.append(best)
            unassigned.discard(best)
        greedy.append(group)
    results = [_swap_search(start, cost) for start in (greedy, neighbour)]
    groups = min(results, key=cost.total)
    groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
    return groups, cost.total(groups), cost.total(neighbour)


def _swap_search(groups: list[list[int]], cost: _GroupingCost) -> list[list[int]]:
    groups = [list(g) for g in groups]
    if len(groups) < 2:
        return groups
    for _ in range(_SWAP_PASSES):
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                for i in range(len(groups[a])):
                    for j in range(len(groups[b])):
                        before = cost.group(groups[a]) + cost.group(groups[b])
                        ga, gb = list(groups[a]), list(groups[b])
                        ga[i], gb[j] = gb[j], ga[i]
                        if cost.group(ga) + cost.group(gb) < before - 1e-12 * max(before, 1e-300):
                            groups[a], groups[b] = ga, gb
                            improved = True
        if not improved:
            break
    return groups


# --- one layer ------------------------------------------------------------------------------------------------


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


def convert_layer(
    block: LatentBlock,
    latent_moment: torch.Tensor,
    query_moment: torch.Tensor | None,
    num_groups: int,
    grouping: str,
    score_aware: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The new attention tensors of one block (float64, by name below the block) and its record.

    In the family's own layout, same names and shapes: ``kv_b_proj`` holds each group's shared up-projection
    once per head of the group, the query's RoPE rows stay where the family has them (only re-indexed with
    the heads), the down-projection is untouched. ``_compact_layout`` turns them into GqlaForCausalLM's.
    """
    attn, d = block.module, block.dims
    m = d.n_h // num_groups
    sqrt_c, inv_sqrt_c = _sqrt_pair(latent_moment)
    x_key, x_value = block.key_up @ sqrt_c, block.value_up @ sqrt_c  # [n_h, d, d_c]
    o_weight = _f64(attn.o_proj.weight)  # [D, n_h d_v]
    o_heads = o_weight.view(-1, d.n_h, d.d_v).permute(1, 0, 2)  # [n_h, D, d_v]
    left_key = left_value = None
    if score_aware:
        left_key = _psd_sqrt(query_moment)
        left_value = _psd_sqrt(o_heads.transpose(1, 2) @ o_heads)

    targets = [_weighted(x_key, left_key), _weighted(x_value, left_value)]
    ranks = [d.d_n, d.d_v]
    if grouping == "similarity" and 1 < num_groups < d.n_h:
        groups, cost, neighbour_cost = similarity_grouping(targets, ranks, num_groups)
    else:
        groups = [list(range(g * m, (g + 1) * m)) for g in range(num_groups)]
        cost = neighbour_cost = _GroupingCost(targets, ranks).total(groups) if num_groups < d.n_h else 0.0
    permutation = [h for g in groups for h in g]
    reordered = permutation != list(range(d.n_h))
    if block.has_output_gate and reordered and block.output_gate_projection is None:
        raise ConversionError(
            f"{block.path}: similarity grouping re-orders the heads, but the block's per-head output gate is not "
            "computed by one projection whose rows are the heads in order, so it cannot be re-ordered with them; "
            "use grouping='neighbour'"
        )

    kv_b, key_maps, value_maps, kept_k, kept_v = [], [], [], [], []
    for heads in groups:
        index = torch.tensor(heads)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        w_k, a, kk = group_basis(x_key[index], inv_sqrt_c, pick(left_key))
        w_v, b, kv = group_basis(x_value[index], inv_sqrt_c, pick(left_value))
        kv_b.append(torch.cat([w_k, w_v]).repeat(len(heads), 1))
        key_maps.append(a)
        value_maps.append(b)
        kept_k.append(kk)
        kept_v.append(kv)
    key_maps = torch.cat(key_maps)  # [n_h, d_n, d_n], in new head order
    value_maps = torch.cat(value_maps)
    perm = torch.tensor(permutation)

    # queries: new head j is old head perm[j]; its no-RoPE rows get A_j^T (bias as a column of the same map)
    q_linear = _query_linear(attn)
    q_name = "q_proj" if q_linear is getattr(attn, "q_proj", None) else "q_b_proj"
    tensors = {}
    for kind, value in (("weight", q_linear.weight), ("bias", q_linear.bias)):
        if value is not None:
            rows = _f64(value).view(d.n_h, d.d_qk, -1)[perm]
            new_q = torch.cat([key_maps.transpose(1, 2) @ rows[:, : d.d_n], rows[:, d.d_n :]], dim=1)
            tensors[f"{q_name}.{kind}"] = new_q.reshape(value.shape)
    if block.has_output_gate and reordered:  # the gate's rows follow their heads
        gate = attn.get_submodule(block.output_gate_projection)
        for kind, value in (("weight", gate.weight), ("bias", gate.bias)):
            if value is not None:
                rows = _f64(value).reshape(d.n_h, block.output_gate_width, -1)[perm]
                tensors[f"{block.output_gate_projection}.{kind}"] = rows.reshape(value.shape)
    tensors["kv_b_proj.weight"] = torch.cat(kv_b)
    tensors["o_proj.weight"] = (o_heads[perm] @ value_maps).permute(1, 0, 2).reshape(o_weight.shape[0], -1)
    record = {
        "groups": groups,
        "key_kept_energy": sum(kept_k) / len(kept_k),
        "value_kept_energy": sum(kept_v) / len(kept_v),
        "grouping_residual": cost,
        "neighbour_grouping_residual": neighbour_cost,
    }
    return tensors, record


def _compact_layout(block: LatentBlock, tensors: dict[str, torch.Tensor], num_groups: int) -> dict[str, torch.Tensor]:
    """One block's family-layout tensors in GqlaForCausalLM's layout: kv_b_proj once per group, RoPE rows of the
    query and of the down-projection in rotate_half order."""
    d = block.dims
    rope = torch.tensor(block.rope_order, dtype=torch.long)
    compact = dict(tensors)
    for name, value in tensors.items():
        if name.startswith(("q_proj.", "q_b_proj.")):
            rows = value.view(d.n_h, d.d_qk, -1)
            compact[name] = torch.cat([rows[:, : d.d_n], rows[:, d.d_n :][:, rope]], dim=1).reshape(value.shape)
    down = block.module.kv_a_proj_with_mqa
    rows = torch.cat([torch.arange(d.d_c), d.d_c + rope])
    compact["kv_a_proj_with_mqa.weight"] = _f64(down.weight)[rows]
    if down.bias is not None:
        compact["kv_a_proj_with_mqa.bias"] = _f64(down.bias)[rows]
    per_head = tensors["kv_b_proj.weight"].view(d.n_h, d.d_n + d.d_v, d.d_c)
    compact["kv_b_proj.weight"] = per_head[:: d.n_h // num_groups].reshape(-1, d.d_c)
    return compact


# --- the model --------------------------------------------------------------------------------------------------


def _check_gates(blocks: Sequence[LatentBlock]) -> None:
    """Regrouping writes each group's values in a new basis and undoes it in o_proj; a gate that multiplies
    every value channel (rather than a whole head) sits between the two and does not follow the basis, so
    the result would compute something else: refused before any work."""
    for block in blocks:
        if block.output_gate_width > 1:
            raise ConversionError(
                f"{block.path}: its output gate multiplies each of the {block.dims.d_v} value channels of a head "
                "separately; regrouping rewrites the values in a new basis per group, which such a gate does not "
                "follow, so the regrouped model would not be this one. Regrouping supports blocks without a gate or "
                "with one gate value per head; optimize still rewrites this model as it is"
            )


def _check_options(num_groups: int, n_h: int, grouping: str, weighting: str | None) -> None:
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or n_h % num_groups:
        divisors = [g for g in range(1, n_h + 1) if n_h % g == 0]
        raise ConversionError(
            f"num_groups={num_groups} does not divide the {n_h} query heads into equal groups; "
            f"choose one of {divisors}"
        )
    if grouping not in GROUPINGS:
        raise ConversionError(f"grouping={grouping!r} is not known; use one of {', '.join(GROUPINGS)}")
    if weighting not in WEIGHTINGS:
        raise ConversionError(f"weighting={weighting!r} is not known; use None or 'loss'")


def gqla_config_for_latent(source: nn.Module, blocks: Sequence[LatentBlock], num_groups: int) -> GqlaConfig:
    cfg = source.config
    d = blocks[0].dims
    attn = blocks[0].module
    q_first = attn.q_proj if getattr(attn, "q_proj", None) is not None else attn.q_a_proj
    has_norm = isinstance(getattr(attn, "kv_a_layernorm", None), nn.Module)
    mlp = source.model.layers[0].mlp
    return GqlaConfig(
        **model_wide_config_fields(cfg),
        hidden_size=d.hidden_size,
        intermediate_size=getattr(getattr(mlp, "gate_proj", None), "out_features", None) or cfg.intermediate_size,
        num_attention_heads=d.n_h,
        num_key_value_heads=num_groups,
        kv_lora_rank=d.d_c,
        q_lora_rank=d.q_lora_rank,
        qk_rope_head_dim=d.d_R,
        qk_nope_head_dim=d.d_n,
        v_head_dim=d.d_v,
        attention_bias=q_first.bias is not None or attn.kv_a_proj_with_mqa.bias is not None,
        attention_output_bias=attn.o_proj.bias is not None,
        mlp_bias=getattr(getattr(mlp, "gate_proj", None), "bias", None) is not None,
        kv_a_layernorm=has_norm,
        softmax_scale=blocks[0].scaling,
        # a GQLA source's RoPE table (TransGQLA keeps the source's frequencies); None for MLA families
        rope_frequency_dim=getattr(cfg, "rope_frequency_dim", None),
        rope_frequency_indices=getattr(cfg, "rope_frequency_indices", None),
        rope_layer_frequency_indices=getattr(cfg, "rope_layer_frequency_indices", None),
    )


def _expected_state_names(config: GqlaConfig) -> dict[str, tuple[int, ...]]:
    from ..modeling_gqla import GqlaForCausalLM

    with torch.device("meta"):
        model = GqlaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_layout(source: nn.Module, blocks: Sequence[LatentBlock], expected: dict[str, tuple[int, ...]]) -> None:
    """ConversionError (before any calibration) when the source has what a GqlaForCausalLM cannot hold."""
    elsewhere = [b.path for b in blocks if b.layer_index is None]
    if elsewhere:
        raise ConversionError(
            f"latent attention at {elsewhere[0]}, which is not model.layers[i].self_attn (e.g. several attention "
            "blocks per layer): GqlaForCausalLM has one per layer; keep the family's layout (output='family')"
        )
    layers = source.model.layers
    if len(blocks) != len(layers):
        missing = sorted(set(range(len(layers))) - {b.layer_index for b in blocks})
        raise ConversionError(f"latent attention was detected in {len(blocks)} of {len(layers)} layers (not in {missing}); "
                              "GqlaForCausalLM needs every layer to be latent attention; keep the family's layout "
                              "(output='family')")
    for block in blocks[1:]:
        if (block.dims.as_dict() | {"n_g": 0}) != (blocks[0].dims.as_dict() | {"n_g": 0}) or block.scaling != blocks[0].scaling:
            raise ConversionError(f"{block.path} has other dims than {blocks[0].path}; a GqlaConfig has one shape for "
                                  "all layers; keep the family's layout (output='family')")
    unrotated = [b.path for b in blocks if b.rope_layout == "none" and b.dims.d_R]
    if unrotated:
        raise ConversionError(f"{unrotated[0]} does not rotate its {blocks[0].dims.d_R} RoPE key dims, which "
                              "GqlaForCausalLM always rotates; keep the family's layout (output='family')")
    source_names = {n: tuple(t.shape) for n, t in source.state_dict().items()}
    unused = sorted(n for n in source_names if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ConversionError(
            f"{type(source).__name__} has weights GqlaForCausalLM has no place for (e.g. {', '.join(unused[:3])}): "
            "only dense-MLP decoders have a compact form (MoE layers do not); keep the family's layout "
            "(output='family')"
        )


def _regrouped_copy(model: nn.Module, blocks: Sequence[LatentBlock], layer_tensors: Sequence[dict[str, torch.Tensor]],
                    dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``model`` (same class, config and modules) whose attention blocks hold the new tensors."""
    new = copy.deepcopy(model)
    if dtype is not None:
        new.to(dtype)
    with torch.no_grad():
        for block, tensors in zip(blocks, layer_tensors):
            module = new.get_submodule(block.path)
            for name, value in tensors.items():
                parameter = module.get_parameter(name)
                parameter.copy_(value.to(parameter.dtype))
    return new.eval()


def _compact_model(source: nn.Module, blocks: Sequence[LatentBlock], layer_tensors: Sequence[dict[str, torch.Tensor]],
                   config: GqlaConfig, expected: dict[str, tuple[int, ...]], dtype: torch.dtype) -> nn.Module:
    """The GqlaForCausalLM holding the regrouped blocks and the source's other weights."""
    from ..modeling_gqla import GqlaForCausalLM
    from transformers.initialization import no_init_weights

    state = {name: t for name, t in source.state_dict().items() if name in expected}
    for block, tensors in zip(blocks, layer_tensors):
        compact = _compact_layout(block, tensors, config.num_key_value_heads)
        state.update({f"{block.path}.{name}": t for name, t in compact.items()})
    for name, shape in expected.items():  # biases the source lacks (e.g. q_proj's when kv_a has one): zero
        if name not in state and name.endswith(".bias"):
            state[name] = torch.zeros(shape)
    missing = set(expected) - set(state)
    if missing:
        raise ConversionError(f"no source weights for {sorted(missing)[:3]}")
    with no_init_weights():
        new = GqlaForCausalLM(config)
    new.load_state_dict({n: t.detach().to("cpu", dtype, copy=True) for n, t in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        new.tie_weights()
    new.generation_config = copy.deepcopy(source.generation_config)
    return new.eval()


def _check_compact_reproduces(family: nn.Module, compact: nn.Module) -> None:
    """ConversionError naming the source's config fields GqlaConfig lacks when the compact model computes
    something else than the family's (e.g. MiniCPM3's embedding, residual and logit scales)."""
    vocab_size = family.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    device = next(family.parameters()).device
    with torch.no_grad():
        expected = family(input_ids=ids.to(device), use_cache=False).logits.double()
        actual = compact.to(device)(input_ids=ids.to(device), use_cache=False).logits.double()
    error = relative_error(actual, expected)
    tolerance = reproduction_tolerance(family.dtype)
    if not error <= tolerance:
        known = set(GqlaConfig().to_dict())
        fields = sorted(k for k, v in family.config.to_dict().items()
                        if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConversionError(
            f"GqlaForCausalLM does not reproduce {type(family).__name__} (relative logit error {error:.2g}): it has no "
            f"place for what the family's config fields {', '.join(fields) or '(none)'} describe; keep the family's "
            "layout (output='family')"
        )


OUTPUTS = ("family", "gqla")
RECORD_FIELD = "gqla_conversion"  # the config field a regrouped family checkpoint records its conversion in


def convert_mla(
    model: nn.Module,
    *,
    num_groups: int | None = None,
    calibration: CalibrationInput = None,
    tokenizer: Any = None,
    grouping: str | None = None,
    weighting: str | None = None,
    score_aware: bool = False,
    output: str = "family",
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> nn.Module:
    """A latent-attention model (MLA or GQLA) regrouped to ``num_groups`` groups; see module docs.

    ``output="family"`` (default): a copy of ``model``, same class, config and modules, every weight outside the
    attention blocks bit-identical; the config records the conversion under ``gqla_conversion`` (a field stock
    transformers keeps and ignores). ``output="gqla"``: a GqlaForCausalLM, only where it reproduces the family
    (a dense DeepSeek-layout decoder); otherwise a ConversionError names what it cannot hold.
    """
    start = time.perf_counter()
    grouping = grouping or "neighbour"
    if output not in OUTPUTS:
        raise ConversionError(f"output={output!r} is not known; use 'family' (the source's own class) or 'gqla'")
    blocks, candidates = find_latent_blocks(model)
    if not blocks and candidates.unsupported:
        listed = "; ".join(f"{path}: {why}" for path, why in candidates.unsupported)
        raise ConversionError(
            f"{type(model).__name__} holds latent attention that cannot be converted yet ({listed}); the piece named "
            "must be supported by the compiler (report it)"
        )
    if not blocks:
        config = getattr(model, "config", None)
        n_kv = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        asked = ", ".join(f"{k}={v!r}" for k, v in (("num_groups", num_groups), ("grouping", grouping if grouping != "neighbour" else None),
                                                    ("weighting", weighting), ("score_aware", score_aware or None)) if v is not None)
        raise ConversionError(
            f"{asked}: {type(model).__name__} holds no latent attention (the detector checked {candidates.checked} candidate "
            "blocks), so there are no latent groups to regroup; these options are for latent-attention (MLA/GQLA) "
            "models. A GQA model (Llama, Qwen2, Mistral) converts with TransGQLA (kv_lora_rank=, qk_rope_head_dim=) "
            f"to n_g = num_key_value_heads = {n_kv} groups"
        )
    if candidates.left_unchanged:
        listed = "; ".join(f"{path}: {why}" for path, why in candidates.left_unchanged)
        warnings.warn(f"partial conversion: {len(blocks)} latent block(s) converted, {len(candidates.left_unchanged)} "
                      f"block(s) with attention left as they are ({listed})", PartialRewriteWarning, stacklevel=2)
    _check_gates(blocks)
    dims = blocks[0].dims
    num_groups = dims.n_g if num_groups is None else num_groups  # default: the source's own groups (exact)
    for n_h in sorted({b.dims.n_h for b in blocks}):
        _check_options(num_groups, n_h, grouping, weighting)
    compact = output == "gqla"
    if compact:
        config = gqla_config_for_latent(model, blocks, num_groups)
        expected = _expected_state_names(config)
        _check_layout(model, blocks, expected)
    source_dtype = next(model.parameters()).dtype
    out_dtype = source_dtype if dtype is None else getattr(torch, dtype) if isinstance(dtype, str) else dtype

    sequences = prepare_calibration(calibration, vocab_size=model.config.get_text_config().vocab_size,
                                    tokenizer=tokenizer, seed=seed)
    stats = collect_latent_statistics(model, blocks, sequences, weighting=weighting, queries=score_aware,
                                      batch_size=batch_size, progress=progress)
    layer_tensors, records = [], []
    for i, block in enumerate(tqdm(blocks, desc="TransGQLA (latent)", unit="block", disable=not progress)):
        tensors, record = convert_layer(block, stats.latent[i], stats.query[i] if stats.query else None,
                                        num_groups, grouping, score_aware)
        layer_tensors.append(tensors)
        records.append({"block": block.path, "rope_layout": block.rope_layout, **record})
    conversion = {
        "method": "TransGQLA (latent): per-group PCA of the up-projected keys and values in the latent's "
                  "calibration metric, head maps folded into q and o_proj",
        "output": output,
        "source_architecture": type(model).__name__,
        "source_model_type": getattr(model.config, "model_type", None),
        "source_num_groups": dims.n_g,
        "num_groups": num_groups,
        "grouping": grouping,
        "permutation": [[h for g in r["groups"] for h in g] for r in records],
        "weighting": weighting,
        "score_aware": score_aware,
        "calibration": {"source": "random tokens" if calibration is None else "given",
                        "num_sequences": len(sequences), "num_tokens": stats.tokens, "seed": seed},
        "layers": records,
    }
    family = _regrouped_copy(model, blocks, layer_tensors, None if compact else out_dtype)
    if compact:
        config.conversion = conversion
        new = _compact_model(model, blocks, layer_tensors, config, expected, source_dtype)
        _check_compact_reproduces(family, new)
        new = new.to(out_dtype)
    else:
        setattr(family.config, RECORD_FIELD, conversion)
        new = family
    logger.info("TransGQLA (latent): %d blocks, %d -> %d groups (%s grouping, %s layout) in %.1f s; mean kept key "
                "energy %.3f", len(blocks), dims.n_g, num_groups, grouping, output, time.perf_counter() - start,
                sum(r["key_kept_energy"] for r in records) / len(records))
    return new
