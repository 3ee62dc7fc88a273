"""TransGQLA's latent of one layer: the key/value balance, the joint PCA of the no-RoPE keys and the values,
and the layer's new attention tensors (float64) built from a RoPE choice and that PCA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import ConversionError
from .calibration import MOMENT_DAMPING
from .gqa_source import ATTENTION_PROJECTIONS, GqaShape, augmented_weight, split_augmented
from .rope_allocation import RopeChoice, nope_key_weights, query_weights

__all__ = ["LatentBasis", "LayerConversion", "mean_squared_norm", "balance_alpha", "stack_compression_targets",
           "damped_moment", "joint_pca", "build_layer_weights"]

LatentBasis = Literal["pca", "random"]


@dataclass
class LayerConversion:
    """One converted layer: its new attention tensors (by state-dict name suffix) and how much it kept."""

    tensors: dict[str, torch.Tensor]
    rope_kept_energy: float
    latent_kept_energy: float
    alpha: float
    record: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.record = {"rope_kept_energy": self.rope_kept_energy, "latent_kept_energy": self.latent_kept_energy,
                       "alpha": self.alpha}


def mean_squared_norm(w_aug: torch.Tensor, moment: torch.Tensor) -> float:
    """E||W x~||^2 = tr(W C W^T)."""
    return float(torch.einsum("re,ef,rf->", w_aug, moment, w_aug))


def balance_alpha(k_nope: torch.Tensor, v_aug: torch.Tensor, moment: torch.Tensor) -> float:
    """alpha = sqrt(E||k^n||^2 / E||v||^2) (root-mean-square norms, from C; 1 when either side is empty).

    Dividing the no-RoPE keys by alpha before the PCA (and multiplying their up-projection by it) is exact,
    and stops the larger of keys and values from taking the whole latent.
    """
    key_energy, value_energy = mean_squared_norm(k_nope, moment), mean_squared_norm(v_aug, moment)
    if key_energy <= 1e-12 * value_energy or value_energy <= 0:
        return 1.0
    return math.sqrt(key_energy / value_energy)


def stack_compression_targets(k_nope: torch.Tensor, v_aug: torch.Tensor, alpha: float, shape: GqaShape) -> torch.Tensor:
    """W_Y [n_g (d_n + d_v), D + 1], per group g: k^n_g / alpha rows then V_g rows (kv_b_proj's row order)."""
    keys = (k_nope / alpha).view(shape.n_kv, shape.d_h, -1)
    values = v_aug.view(shape.n_kv, shape.d_h, -1)
    return torch.cat([keys, values], dim=1).reshape(shape.max_kv_lora_rank, -1)


def damped_moment(moment: torch.Tensor) -> torch.Tensor:
    """C + MOMENT_DAMPING * mean(diag C) * I."""
    ridge = MOMENT_DAMPING * float(moment.diagonal().mean())
    return moment + ridge * torch.eye(moment.shape[0], dtype=moment.dtype)


def joint_pca(
    w_y: torch.Tensor, moment: torch.Tensor, kv_lora_rank: int, *, basis: LatentBasis = "pca",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """Latent basis R_c [n_g (d_n + d_v), d_c] (orthonormal columns) and the share of E||Y||^2 it keeps.

    "pca": top eigenvectors of the uncentered second moment W_Y C W_Y^T (C damped, see MOMENT_DAMPING).
    "random": a random orthonormal basis of the same rank, the baseline that shows what PCA buys.
    """
    covariance = w_y @ damped_moment(moment) @ w_y.T
    if basis == "pca":
        _, eigvecs = torch.linalg.eigh(covariance)
        r_c = eigvecs.flip(-1)[:, :kv_lora_rank]
    elif basis == "random":
        gaussian = torch.randn(w_y.shape[0], kv_lora_rank, dtype=torch.float64, generator=generator)
        r_c = torch.linalg.qr(gaussian).Q
    else:
        raise ConversionError(f"unknown latent basis {basis!r}; use 'pca' or 'random'")
    total = float(covariance.trace())
    kept = float(torch.einsum("rc,rs,sc->", r_c, covariance, r_c))
    return r_c, kept / total if total > 0 else 1.0


def build_layer_weights(
    attention: nn.Module,
    moment: torch.Tensor,
    rope: RopeChoice,
    shape: GqaShape,
    kv_lora_rank: int,
    *,
    basis: LatentBasis = "pca",
    generator: torch.Generator | None = None,
    alpha: float | None = None,
) -> LayerConversion:
    """The GQLA attention tensors of one layer (float64), keyed by name below ``self_attn.``.

    ``alpha`` overrides the key/value balance (default ``balance_alpha``; any value is exact at full rank).
    """
    q_aug, k_aug, v_aug = (augmented_weight(getattr(attention, name)) for name in ATTENTION_PROJECTIONS)
    k_nope = nope_key_weights(k_aug, rope.rows)
    alpha = balance_alpha(k_nope, v_aug, moment) if alpha is None else alpha
    w_y = stack_compression_targets(k_nope, v_aug, alpha, shape)
    r_c, latent_kept = joint_pca(w_y, moment, kv_lora_rank, basis=basis, generator=generator)

    up_scale = torch.cat([torch.full((shape.d_h,), alpha, dtype=torch.float64),
                          torch.ones(shape.d_h, dtype=torch.float64)]).repeat(shape.n_kv)
    q_weight, q_bias = split_augmented(query_weights(q_aug, rope.rows, shape))
    kv_a_weight, kv_a_bias = split_augmented(torch.cat([r_c.T @ w_y, rope.rows @ k_aug]))
    o_weight = attention.o_proj.weight.detach().to("cpu", torch.float64)
    tensors = {
        "q_proj.weight": q_weight,
        "q_proj.bias": q_bias,
        "kv_a_proj_with_mqa.weight": kv_a_weight,
        "kv_a_proj_with_mqa.bias": kv_a_bias,
        "kv_b_proj.weight": up_scale[:, None] * r_c,
        "o_proj.weight": o_weight,
    }
    if attention.o_proj.bias is not None:
        tensors["o_proj.bias"] = attention.o_proj.bias.detach().to("cpu", torch.float64)
    return LayerConversion(tensors=tensors, rope_kept_energy=rope.kept_energy, latent_kept_energy=latent_kept,
                           alpha=alpha)
