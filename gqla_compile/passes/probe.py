"""Probes: evaluate a captured graph on chosen inputs to read what its shapes alone do not say.

The group structure of the up-projection (n_g) and its per-group matrices come from feeding basis vectors
where the latent was (so any row layout, GQA broadcast or per-head expansion is handled the same way); the
same feeds (parameters, zero user inputs of a chosen length) serve conversion's probes of the RoPE layout.
"""

from __future__ import annotations

import torch
from torch import fx

from ..capture import CapturedAttention
from ..errors import ShapeMismatchError
from .graph import evaluate_nodes, tensor_meta
from .match import LatentAttentionMatch, UpProjections

__all__ = ["probe_up_projections", "probe_feeds", "batch_and_seq_symbols"]


def probe_up_projections(
    capture: CapturedAttention,
    match: LatentAttentionMatch,
    parameters: dict[str, torch.Tensor],
) -> UpProjections:
    """Feed basis vectors where the latent was and read the keys' no-RoPE part and the values.

    The map latent -> (K_nope, V) is linear, so column s of each head's matrix is the output for basis
    vector e_s. Heads whose matrices are identical in consecutive blocks form one group: that is n_g,
    whether the graph broadcast K/V per group (GQA) or per head (MLA, n_g = n_h).
    """
    dims = match.dims
    feeds = probe_feeds(capture, match, parameters, seq=dims.d_c)
    latent_meta = tensor_meta(match.latent)
    device = _parameters_device(parameters)
    basis = torch.eye(dims.d_c, dtype=latent_meta.dtype, device=device)
    feeds[match.latent] = _in_layout(basis, latent_meta, capture, batch=1, seq=dims.d_c)
    rope_meta = tensor_meta(match.rope_key)
    feeds[match.rope_key] = torch.zeros(_concrete_shape(rope_meta, capture, batch=1, seq=dims.d_c),
                                        dtype=rope_meta.dtype, device=device)
    with torch.no_grad():
        key, value = evaluate_nodes(capture.graph_module, [match.key, match.value], feeds)
        feeds[match.latent] = torch.zeros_like(feeds[match.latent])
        key0, value0 = evaluate_nodes(capture.graph_module, [match.key, match.value], feeds)
    if key0[..., : dims.d_n].abs().max() > 0 or value0.abs().max() > 0:
        raise ShapeMismatchError(
            f"{match.module_path}: the latent up-projection has a bias; absorbing it is not supported"
        )
    # key: [1, heads, d_c, d_n + d_R] -> per head [d_n, d_c]
    w_uk = key[0, :, :, : dims.d_n].transpose(1, 2)
    w_uv = value[0].transpose(1, 2)
    w_uk, w_uv = _per_query_head(w_uk, dims.n_h), _per_query_head(w_uv, dims.n_h)
    n_g = _group_count(w_uk, w_uv)
    step = dims.n_h // n_g
    return UpProjections(key=w_uk[::step].contiguous(), value=w_uv[::step].contiguous())


def _per_query_head(per_kv_head: torch.Tensor, n_h: int) -> torch.Tensor:
    heads = per_kv_head.shape[0]
    if n_h % heads:
        raise ShapeMismatchError(f"{heads} key/value heads do not divide {n_h} query heads")
    return per_kv_head.repeat_interleave(n_h // heads, dim=0)


def _group_count(w_uk: torch.Tensor, w_uv: torch.Tensor) -> int:
    """Smallest n_g for which each block of n_h / n_g consecutive heads shares one up-projection."""
    n_h = w_uk.shape[0]
    for n_g in range(1, n_h + 1):
        if n_h % n_g:
            continue
        step = n_h // n_g
        if all(
            torch.equal(w[g * step], w[g * step + j]) for w in (w_uk, w_uv) for g in range(n_g) for j in range(step)
        ):
            return n_g
    return n_h


def probe_feeds(capture, match, parameters, *, seq: int) -> dict[fx.Node, torch.Tensor]:
    """Parameters and zero user inputs sized for a probe of ``seq`` tokens and batch 1."""
    feeds: dict[fx.Node, torch.Tensor] = {}
    device = _parameters_device(parameters)
    for node in capture.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in capture.parameter_inputs:
            feeds[node] = parameters[capture.parameter_inputs[node.name]]
        elif (meta := tensor_meta(node)) is not None:
            feeds[node] = torch.zeros(_concrete_shape(meta, capture, batch=1, seq=seq), dtype=meta.dtype, device=device)
    return feeds


def _parameters_device(parameters: dict[str, torch.Tensor]) -> torch.device:
    """Where the block's weights live: the probes' inputs go there (a model on a GPU is probed on it)."""
    return next((t.device for t in parameters.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))


def _concrete_shape(meta: torch.Tensor, capture: CapturedAttention, *, batch: int, seq: int) -> list[int]:
    batch_sym, seq_sym = batch_and_seq_symbols(capture)
    shape = []
    for size in meta.shape:
        text = str(size)
        shape.append(batch if text == batch_sym else seq if text == seq_sym else int(size))
    return shape


def _in_layout(rows: torch.Tensor, meta: torch.Tensor, capture, *, batch: int, seq: int) -> torch.Tensor:
    """Place a [seq, features] matrix into a tensor of ``meta``'s layout (batch 1, other dims broadcast)."""
    shape = _concrete_shape(meta, capture, batch=batch, seq=seq)
    _, seq_sym = batch_and_seq_symbols(capture)
    seq_dim = next(i for i, s in enumerate(meta.shape) if str(s) == seq_sym)
    last = len(shape) - 1
    view = [seq if i == seq_dim else rows.shape[1] if i == last else 1 for i in range(len(shape))]
    return rows.reshape(view).expand(shape).contiguous()


def batch_and_seq_symbols(capture: CapturedAttention) -> tuple[str, str]:
    """The symbolic batch and sequence sizes, read off the hidden-states input [B, T, D]."""
    for node in capture.graph_module.graph.nodes:
        meta = tensor_meta(node)
        if node.op == "placeholder" and node.name not in capture.parameter_inputs and meta is not None and meta.dim() == 3:
            return str(meta.shape[0]), str(meta.shape[1])
    raise ShapeMismatchError(f"{capture.module_path}: no [batch, seq, hidden] input found")
