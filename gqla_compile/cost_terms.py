"""The terms the paths' cost is written in: the weights a decode step's projections read (:class:`Matmul`) and
the FLOPs of the projections every path shares. ``DecodePath.projection_matmuls`` lists its own from these, and
the roofline (roofline.py) prices them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dims import LatentDims


@dataclass(frozen=True)
class Matmul:
    """A weight the attention projections read once per decode step, and the FLOPs it costs per new token."""

    name: str
    weight_elements: int
    flops_per_token: int
    sharded: bool = True  # split over TP ranks; replicated weights (every rank needs the whole latent) are not


def linear(name: str, out_features: int, in_features: int, *, sharded: bool = True) -> Matmul:
    """A dense weight [out_features, in_features] applied to every new token."""
    return Matmul(name, out_features * in_features, 2 * out_features * in_features, sharded)


def per_group(name: str, dims: LatentDims, rows: int) -> Matmul:
    """W_UK or W_UV applied as a batched matmul: one [rows, d_c] matrix per group, used by each of its heads."""
    return Matmul(name, dims.n_g * rows * dims.d_c, 2 * dims.n_h * rows * dims.d_c)


def query_matmuls(dims: LatentDims) -> list[Matmul]:
    """q_proj (or q_a_proj + q_b_proj), which both paths run unchanged."""
    rows = dims.n_h * (dims.d_n + dims.d_R)
    if dims.q_lora_rank is None:
        return [linear("q_proj", rows, dims.hidden_size)]
    return [linear("q_a_proj", dims.q_lora_rank, dims.hidden_size, sharded=False),
            linear("q_b_proj", rows, dims.q_lora_rank)]


def down_projection(dims: LatentDims) -> Matmul:
    """W_DKV: every rank needs the whole latent, so it is replicated under tensor parallelism."""
    return linear("kv_a_proj", dims.d_c + dims.d_R, dims.hidden_size, sharded=False)


def output_flops(dims: LatentDims, value_dims: int) -> int:
    """o_proj's FLOPs per new token over ``value_dims`` inputs per head."""
    return 2 * dims.hidden_size * dims.n_h * value_dims
