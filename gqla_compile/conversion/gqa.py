"""TransGQLA: a GQA checkpoint (Llama, Qwen2, Mistral; MHA included) to a GQLA model (DESIGN.md section 1).

The model is converted layer by layer on calibration activations (``calibration.LayerStream``): the inputs of
layer i come from the model whose layers before i are already converted (``sequential``, the default) or from
the source. With x~ = [x; 1] the attention input with a constant appended (so biases ride along as one more
weight column) and C = E[x~ x~^T] its moment, per layer:

1. RoPE step (RoRoPE / FreqFold). Neighbouring rotary frequencies are folded into bands of b (a power of two);
   per band, the 2-D components (dims i and i + d_h/2) of its b frequencies and n_kv key heads are rotated by
   the eigenvectors of their energy. The same rotation on both components commutes with RoPE when b = 1 (and
   approximately within a band), so it folds into k_proj and the query. The m = (d_R/2) b / (d_h/2) leading
   component pairs of every band keep RoPE, rotated at a frequency of the band (pair j of band a at table
   frequency a b + floor(j b / m)); RoPE is dropped on the rest: the no-RoPE key of group g becomes
   k^n_g = P_g (I - R_S^T R_S) K, its query the original q_h (d_n = d_h), and the query's RoPE part is
   R_S P_g^T q_h. b = 1 is plain RoRoPE (one pair per frequency at d_R = d_h; everything, hence exact, at
   d_R = n_kv d_h, where b = 1 is the only choice); otherwise every layer takes the b whose converted attention
   output is closest to the source's on calibration data (wider bands also win at d_R = d_h: they give the
   leading directions of neighbouring frequencies the RoPE dims that weak ones would take). Per-layer
   frequency tables go into the config.
   (``rope_allocation="energy"``, the former method, ranks pairs by key energy across frequencies instead; it
   drops RoPE on the fast frequencies and loses several times more.)
2. Balance: alpha = sqrt(E||k^n||^2 / E||V||^2), so that keys and values weigh alike in the PCA; with
   ``balance="auto"`` (default) the layer's chosen RoPE step is also built with alpha / 2 and 2 alpha, and the
   one whose attention output is closest to the source's on calibration data is kept (on SmolLM2-135M at
   d_R 64 / d_c 44 this takes held-out perplexity 85.2 -> 75.8).
3. Joint PCA of Y = [k^n_g / alpha ; V_g]_g (uncentered, so biases pass through the latent's bias) to d_c:
   the down-projection is R_c^T W_Y, the up-projection per group [alpha R_c(keys of g) ; R_c(values of g)].
4. Output fitting (``fit_output``, default): o_proj is linear in the heads' outputs, so it is refitted by least
   squares to the source attention's output on the same inputs; optionally (``fit_steps``) a few Adam steps
   on the layer's attention weights follow.
5. softmax_scale keeps the source's d_h^-0.5; everything outside attention is copied.

Weight algebra is float64 on CPU ("augmented" matrices: [out, D + 1], bias in the last column); the converted
layers run in the source's dtype and device for choosing, fitting and the sequential stream.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..configuration_gqla import GqlaConfig
from ..errors import ConversionError
from .calibration import (CalibrationInput, DEFAULT_BATCH_SIZE, LayerStream, attention_input_moment,
                          collect_attention_input_moments, prepare_calibration)
from .common import model_wide_config_fields

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GqaShape",
    "convert_gqa",
    "check_gqa_model",
    "RopeChoice",
    "band_energy",
    "frequency_energy",
    "rorope_rotation",
    "freqfold_band_sizes",
    "freqfold_rope",
    "allocate_rope_frequencies",
    "energy_ranked_rope",
    "rope_key_rows",
    "query_weights",
    "nope_key_weights",
    "balance_alpha",
    "stack_compression_targets",
    "joint_pca",
    "build_layer_weights",
    "fit_output_projection",
    "gqla_config_for",
]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
LatentBasis = Literal["pca", "random"]
# Relative ridge added to C before the PCA: directions calibration never excited are still ranked by the
# weights' own energy, so a latent as wide as rank(W_Y) reproduces Y exactly on every input.
MOMENT_DAMPING = 1e-6
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class GqaShape:
    """Attention shape of a GQA source model."""

    n_h: int  # query heads
    n_kv: int  # key/value heads (= latent groups n_g of the result)
    d_h: int  # head dim
    hidden_size: int

    @property
    def key_width(self) -> int:
        """n_kv * d_h: all key (or value) dims of one token."""
        return self.n_kv * self.d_h

    @property
    def n_freq(self) -> int:
        return self.d_h // 2

    @property
    def max_kv_lora_rank(self) -> int:
        """n_g (d_n + d_v) = 2 n_kv d_h: the width of the no-RoPE keys and values that the latent compresses."""
        return 2 * self.key_width

    def group_of_heads(self) -> torch.Tensor:
        """KV head (group) of every query head, as transformers' ``repeat_kv`` assigns them."""
        return torch.arange(self.n_h) // (self.n_h // self.n_kv)

    @classmethod
    def from_config(cls, config: Any) -> "GqaShape":
        n_h = config.num_attention_heads
        d_h = getattr(config, "head_dim", None) or config.hidden_size // n_h
        return cls(n_h=n_h, n_kv=getattr(config, "num_key_value_heads", None) or n_h, d_h=d_h,
                   hidden_size=config.hidden_size)


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


# --- checks -------------------------------------------------------------------------------------------------


def check_gqa_model(model: nn.Module) -> GqaShape:
    """The source's attention shape; ConversionError for architectures the recipe does not cover."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"cannot convert {name}: TransGQLA supports {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(GQA/MHA attention with linear q/k/v projections and full rotary embedding)"
        )
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(
            f"{name} uses partial_rotary_factor={rope['partial_rotary_factor']}; TransGQLA needs RoPE on every head dim"
        )
    shape = GqaShape.from_config(config)
    if shape.d_h % 2:
        raise ConversionError(f"{name} has an odd head_dim ({shape.d_h}); RoPE needs pairs")
    return shape


def check_ranks(shape: GqaShape, kv_lora_rank: int, qk_rope_head_dim: int, num_groups: int | None) -> None:
    """ConversionError naming the value and its limit for ranks the source cannot give."""
    if num_groups is not None and num_groups != shape.n_kv:
        raise ConversionError(
            f"num_groups={num_groups}: a GQA source converts to n_g = num_key_value_heads = {shape.n_kv} groups; "
            "conversion to fewer groups is not available yet"
        )
    d_r = qk_rope_head_dim
    if not isinstance(d_r, int) or d_r <= 0 or d_r % 2 or d_r > shape.key_width:
        raise ConversionError(
            f"qk_rope_head_dim={d_r} is not possible: it must be a positive even number at most "
            f"num_key_value_heads * head_dim = {shape.n_kv} * {shape.d_h} = {shape.key_width}"
        )
    if not isinstance(kv_lora_rank, int) or kv_lora_rank <= 0 or kv_lora_rank > shape.max_kv_lora_rank:
        raise ConversionError(
            f"kv_lora_rank={kv_lora_rank} is not possible (d_c larger than possible): it must be positive and at most "
            f"n_g * (d_n + d_v) = {shape.n_kv} * ({shape.d_h} + {shape.d_h}) = {shape.max_kv_lora_rank}"
        )


def _warn_sliding_window(config: Any) -> bool:
    """True (with a warning) when the source attends through a sliding window that GQLA does not have."""
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    if uses_window:
        logger.warning("source sliding_window=%s is dropped: the GQLA model attends to the full context "
                       "(identical for sequences up to the window)", window)
    return bool(uses_window)


# --- weights ------------------------------------------------------------------------------------------------


def augmented_weight(linear: nn.Linear) -> torch.Tensor:
    """[out, in + 1] float64: the weight with the bias (or zeros) as the last column."""
    weight = linear.weight.detach().to(device="cpu", dtype=torch.float64)
    bias = linear.bias.detach().to(device="cpu", dtype=torch.float64) if linear.bias is not None else None
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias
    return torch.cat([weight, bias[:, None]], dim=1)


def split_augmented(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of an augmented matrix."""
    return matrix[:, :-1], matrix[:, -1]


# --- RoRoPE and FreqFold -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeChoice:
    """One layer's RoPE step: the kept rotated key components and the table frequency each is rotated at."""

    rows: torch.Tensor  # R_S [d_R, n_kv d_h], orthonormal rows, rotate_half layout (pair p: rows p and p + d_R/2)
    frequency_indices: list[int]  # [d_R/2]: frequency of pair p in the source's rotary table
    band_size: int  # neighbouring frequencies folded into one band (1: plain RoRoPE; 0: energy ranking)
    kept_energy: float  # share of the layer's key energy in the kept components


def band_energy(k_aug: torch.Tensor, moment: torch.Tensor, shape: GqaShape, band_size: int = 1) -> torch.Tensor:
    """E_a = E[a_a a_a^T + b_a b_a^T] per band a of ``band_size`` neighbouring frequencies: [n_bands, m, m].

    a_a / b_a stack the first / second rotate_half component of every (KV head g, frequency f of the band),
    component index g * band_size + f (m = n_kv * band_size). Pre-RoPE keys suffice: RoPE turns (a, b) of one
    frequency by one angle, which leaves this sum unchanged; within a band of several frequencies it holds
    only on average (FreqFold's approximation).
    """
    n_bands = shape.n_freq // band_size
    heads = k_aug.view(shape.n_kv, 2, n_bands, band_size, -1)  # [g, half, band, f, D + 1]
    parts = heads.permute(1, 2, 0, 3, 4).reshape(2, n_bands, shape.n_kv * band_size, -1)
    return sum(torch.einsum("bie,ef,bjf->bij", part, moment, part) for part in parts)


def frequency_energy(k_aug: torch.Tensor, moment: torch.Tensor, shape: GqaShape) -> torch.Tensor:
    """E_i per single frequency i: [n_freq, n_kv, n_kv] (``band_energy`` with bands of one frequency)."""
    return band_energy(k_aug, moment, shape, 1)


def rorope_rotation(energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [n_bands, m] (descending) and eigenvectors U [n_bands, m, m] (columns) of each E_a.

    Rotated component (a, j) = U_a[:, j]^T a_a (and likewise b_a) carries energy eigenvalue (a, j). Damping
    E_a by a multiple of the identity would not change U_a, so none is added.
    """
    eigvals, eigvecs = torch.linalg.eigh(energy)
    return eigvals.flip(-1).clamp_min(0.0), eigvecs.flip(-1)


def rope_key_rows(eigvecs: torch.Tensor, kept: list[tuple[int, int]], band_size: int, shape: GqaShape) -> torch.Tensor:
    """R_S [d_R, n_kv d_h]: the kept rotated components (band a, rank j), in rotate_half layout.

    Row p (pair p's first component) puts U_a[g * band_size + f, j] on dim a * band_size + f of KV head g; row
    p + d_R/2 the same on the second-half dims. Rows are orthonormal.
    """
    half = len(kept)
    rows = torch.zeros(2 * half, shape.n_kv, 2, shape.n_freq, dtype=torch.float64)
    for p, (a, j) in enumerate(kept):
        block = eigvecs[a, :, j].view(shape.n_kv, band_size)
        band = slice(a * band_size, (a + 1) * band_size)
        rows[p, :, 0, band] = block
        rows[p + half, :, 1, band] = block
    return rows.view(2 * half, shape.key_width)


def freqfold_band_sizes(shape: GqaShape, qk_rope_head_dim: int) -> list[int]:
    """Band sizes b (powers of two dividing the frequency count) that give every band the same whole number of
    kept pairs m = (d_R/2) b / n_freq, with 1 <= m <= n_kv b."""
    sizes, band = [], 1
    while band <= shape.n_freq:
        kept, remainder = divmod(qk_rope_head_dim // 2 * band, shape.n_freq)
        if shape.n_freq % band == 0 and not remainder and 1 <= kept <= shape.n_kv * band:
            sizes.append(band)
        band *= 2
    return sizes


def freqfold_rope(k_aug: torch.Tensor, moment: torch.Tensor, shape: GqaShape, qk_rope_head_dim: int,
                  band_size: int) -> RopeChoice:
    """FreqFold: per band of ``band_size`` neighbouring frequencies, a PCA over (frequencies x KV heads); the m
    leading component pairs of every band keep RoPE, pair j of band a at table frequency a b + floor(j b / m).

    Band size 1 is plain RoRoPE (one rotated pair per frequency when d_R = d_h; every component of every
    frequency, hence exact, when d_R = n_kv d_h).
    """
    if band_size not in freqfold_band_sizes(shape, qk_rope_head_dim):
        raise ConversionError(
            f"rope band size {band_size} does not fit qk_rope_head_dim={qk_rope_head_dim} with {shape.n_freq} "
            f"frequencies; possible: {freqfold_band_sizes(shape, qk_rope_head_dim)}"
        )
    eigvals, eigvecs = rorope_rotation(band_energy(k_aug, moment, shape, band_size))
    per_band = qk_rope_head_dim // 2 * band_size // shape.n_freq
    kept = [(a, j) for a in range(shape.n_freq // band_size) for j in range(per_band)]
    frequencies = [a * band_size + j * band_size // per_band for a, j in kept]
    kept_energy = float(eigvals[:, :per_band].sum() / eigvals.sum().clamp_min(1e-300))
    return RopeChoice(rope_key_rows(eigvecs, kept, band_size, shape), frequencies, band_size, kept_energy)


def allocate_rope_frequencies(eigvals: torch.Tensor, qk_rope_head_dim: int) -> list[int]:
    """Energy ranking (the ``rope_allocation="energy"`` option): how many rotated pairs of each frequency keep
    RoPE, shared by all layers: counts [n_freq].

    ``eigvals`` is [L, n_freq, n_kv] (descending in the last dim). Every layer keeps the top-m_i components of
    frequency i with the same m_i, chosen to maximize the kept share of each layer's key energy summed over
    layers (gains are non-increasing in j, so the d_R/2 largest summed shares, ties to lower j, are optimal).
    It drops RoPE on the fast, low-energy frequencies that carry the position information: FreqFold loses
    several times less.
    """
    totals = eigvals.sum(dim=(1, 2), keepdim=True)
    share = (eigvals / torch.where(totals > 0, totals, torch.ones_like(totals))).sum(dim=0)  # [n_freq, n_kv]
    n_freq, n_kv = share.shape
    order = sorted(range(n_freq * n_kv), key=lambda flat: (-float(share.flatten()[flat]), flat % n_kv, flat // n_kv))
    counts = [0] * n_freq
    for flat in order[: qk_rope_head_dim // 2]:
        counts[flat // n_kv] += 1
    return counts


def rope_frequency_indices(counts: list[int]) -> list[int]:
    """Frequency index of each kept RoPE pair p, in pair order (frequency i repeated counts[i] times)."""
    return [i for i, count in enumerate(counts) for _ in range(count)]


def energy_ranked_rope(eigvals: torch.Tensor, eigvecs: torch.Tensor, counts: list[int], shape: GqaShape) -> RopeChoice:
    """The RopeChoice of one layer under the energy ranking (``allocate_rope_frequencies``' counts)."""
    kept = [(i, j) for i, count in enumerate(counts) for j in range(count)]
    kept_energy = float(sum(eigvals[i, :count].sum() for i, count in enumerate(counts)) / eigvals.sum().clamp_min(1e-300))
    return RopeChoice(rope_key_rows(eigvecs, kept, 1, shape), rope_frequency_indices(counts), 0, kept_energy)


def query_weights(q_aug: torch.Tensor, rope_rows: torch.Tensor, shape: GqaShape) -> torch.Tensor:
    """New q_proj [n_h (d_h + d_R), D + 1]: per head, q_h itself (no-RoPE part) then R_S P_g^T q_h (RoPE part)."""
    q_heads = q_aug.view(shape.n_h, shape.d_h, -1)
    blocks = rope_rows.view(-1, shape.n_kv, shape.d_h).transpose(0, 1)  # [n_kv, d_R, d_h]: R_S P_g^T
    q_rope = torch.einsum("hrd,hde->hre", blocks[shape.group_of_heads()], q_heads)
    return torch.cat([q_heads, q_rope], dim=1).reshape(-1, q_aug.shape[1])


def nope_key_weights(k_aug: torch.Tensor, rope_rows: torch.Tensor) -> torch.Tensor:
    """(I - R_S^T R_S) W_K: the key dims left without RoPE, still per head block (row g*d_h + d is k^n_g[d])."""
    return k_aug - rope_rows.T @ (rope_rows @ k_aug)


# --- balancing and PCA --------------------------------------------------------------------------------------


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


# --- one layer ----------------------------------------------------------------------------------------------


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
    q_aug, k_aug, v_aug = (augmented_weight(getattr(attention, name)) for name in _ATTENTION_PROJECTIONS)
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


# --- the model ----------------------------------------------------------------------------------------------


def gqla_config_for(
    source_config: Any,
    *,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    rope_frequency_indices: list[int] | list[list[int]],
    attention_bias: bool = False,
    attention_output_bias: bool = False,
    conversion: dict | None = None,
) -> GqlaConfig:
    """The GqlaConfig of a GQA source converted with these ranks (needs no weights).

    ``rope_frequency_indices``: one list for all layers, or one per layer (stored as one shared list when the
    layers agree).
    """
    shape = GqaShape.from_config(source_config)
    tables = [list(table) for table in rope_frequency_indices] if rope_frequency_indices and isinstance(
        rope_frequency_indices[0], (list, tuple)) else [list(rope_frequency_indices)]
    shared = all(table == tables[0] for table in tables)
    return GqlaConfig(
        **model_wide_config_fields(source_config),
        hidden_size=shape.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_attention_heads=shape.n_h,
        num_key_value_heads=shape.n_kv,
        kv_lora_rank=kv_lora_rank,
        q_lora_rank=None,
        qk_rope_head_dim=qk_rope_head_dim,
        qk_nope_head_dim=shape.d_h,
        v_head_dim=shape.d_h,
        attention_bias=attention_bias,
        attention_output_bias=attention_output_bias,
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        kv_a_layernorm=False,
        softmax_scale=shape.d_h**-0.5,
        rope_frequency_dim=shape.d_h,
        rope_frequency_indices=tables[0] if shared else None,
        rope_layer_frequency_indices=None if shared else tables,
        conversion=conversion,
    )


def _is_replaced(name: str) -> bool:
    """State-dict names of the source's q/k/v projections (rebuilt by the conversion)."""
    return any(f".self_attn.{proj}." in name for proj in _ATTENTION_PROJECTIONS)


def assemble_model(source: nn.Module, config: GqlaConfig, attention: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A GqlaForCausalLM holding the source's other weights (copied) and the new attention tensors, in ``dtype``."""
    from transformers.initialization import no_init_weights

    from ..modeling_gqla import GqlaForCausalLM

    state = {name: tensor for name, tensor in source.state_dict().items() if not _is_replaced(name)}
    state.update(attention)
    with no_init_weights():
        model = GqlaForCausalLM(config)
    model.load_state_dict({name: t.detach().to("cpu", dtype, copy=True) for name, t in state.items()},
                          strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = copy.deepcopy(source.generation_config)
    return model.eval()


def _as_dtype(dtype: torch.dtype | str | None, source: nn.Module) -> torch.dtype:
    if dtype is None:
        return next(source.parameters()).dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


RopeAllocation = Literal["freqfold", "energy"]
# Calibration batches on which the band size of each layer is chosen (the attention-output error decides).
CHOICE_BATCHES = 1
# Key/value balance scales tried against balance_alpha's (balance="auto"): the output error picks one per layer.
BALANCE_SCALES = (0.5, 2.0)
# Relative ridge of the o_proj least squares (the pre-o_proj activations of a narrow latent are rank-deficient).
FIT_RIDGE = 1e-6


def rope_candidates(k_aug: torch.Tensor, moment: torch.Tensor, shape: GqaShape, qk_rope_head_dim: int,
                    band_size: int | Literal["auto"]) -> list[RopeChoice]:
    """The RoPE steps to choose from for one layer: the given band size; or, with "auto", every possible FreqFold
    band size (band 1, plain RoRoPE, among them when d_R >= d_h), and only band 1 at d_R = n_kv d_h, where it
    keeps every component and is exact."""
    if band_size != "auto":
        return [freqfold_rope(k_aug, moment, shape, qk_rope_head_dim, band_size)]
    sizes = freqfold_band_sizes(shape, qk_rope_head_dim)
    if not sizes:
        raise ConversionError(
            f"qk_rope_head_dim={qk_rope_head_dim} cannot be split evenly over {shape.n_freq} rotary frequencies "
            f"(FreqFold needs (d_R/2) * b / {shape.n_freq} whole for a power-of-two band size b); use a "
            "divisor or multiple of head_dim, or rope_allocation='energy'"
        )
    if qk_rope_head_dim == shape.key_width:
        sizes = [1]
    return [freqfold_rope(k_aug, moment, shape, qk_rope_head_dim, size) for size in sizes]


class _LayerBuilder:
    """Turns one layer's float64 tensors into a runnable ``GqlaAttention`` (in the source's dtype and device) and
    its rotary cos/sin per calibration batch: what choosing, fitting and the sequential stream run."""

    def __init__(self, source: nn.Module, shape: GqaShape, kv_lora_rank: int, qk_rope_head_dim: int,
                 has_qkv_bias: bool) -> None:
        from ..modeling_gqla import GqlaAttention, GqlaRotaryEmbedding

        self._attention_class, self._rotary_class = GqlaAttention, GqlaRotaryEmbedding
        self.config = gqla_config_for(
            source.config, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
            rope_frequency_indices=[p % shape.n_freq for p in range(qk_rope_head_dim // 2)],
            attention_bias=has_qkv_bias, attention_output_bias=source.model.layers[0].self_attn.o_proj.bias is not None,
        )
        self.config._attn_implementation = "sdpa"
        self.dtype = next(source.parameters()).dtype
        self.device = next(source.parameters()).device

    def attention(self, index: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        module = self._attention_class(self.config, index)
        module.load_state_dict({name: t for name, t in tensors.items()
                                if not name.endswith(".bias") or self.config.attention_bias or name.startswith("o_proj")},
                               strict=True)
        return module.to(device=self.device, dtype=self.dtype).eval()

    def embeddings(self, rope: RopeChoice, stream: LayerStream) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rotary = self._rotary_class(self.config, frequency_indices=rope.frequency_indices).to(self.device)
        return [rotary(hidden, positions) for hidden, positions in zip(stream.states, stream.positions)]


@torch.no_grad()
def output_error(stream: LayerStream, layer: nn.Module, attention: nn.Module,
                 embeddings: list[tuple[torch.Tensor, torch.Tensor]], targets: list[torch.Tensor]) -> float:
    """sum ||attention(x) - target||^2 / sum ||target||^2 over the first len(targets) batches."""
    error, norm = 0.0, 0.0
    for (_, out), target in zip(stream.attention_outputs(layer, attention, embeddings, limit=len(targets)), targets):
        error += float((out.double() - target.double()).pow(2).sum())
        norm += float(target.double().pow(2).sum())
    return error / max(norm, 1e-300)


@torch.no_grad()
def fit_output_projection(stream: LayerStream, layer: nn.Module, attention: nn.Module,
                          embeddings: list[tuple[torch.Tensor, torch.Tensor]], targets: list[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """Least-squares o_proj of the converted ``attention`` against the source attention's outputs ``targets``.

    o_proj is linear in its input z (the heads' attention outputs), so W = argmin sum ||W [z;1] - y||^2 has a
    closed form from G = sum [z;1][z;1]^T and H = sum [z;1] y^T (small ridge, see FIT_RIDGE). Returns (weight,
    bias or None, relative loss before, after); when the fit does not lower the loss the old weights come back,
    so it never increases it.
    """
    o_proj = attention.o_proj
    has_bias = o_proj.bias is not None
    captured: list[torch.Tensor] = []
    handle = o_proj.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    gram = cross = None
    target_energy = 0.0
    try:
        for (_, _), target in zip(stream.attention_outputs(layer, attention, embeddings), targets):
            z = captured.pop().reshape(-1, o_proj.in_features).double().cpu()
            if has_bias:
                z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
            y = target.reshape(-1, o_proj.out_features).double().cpu()
            gram = z.T @ z if gram is None else gram + z.T @ z
            cross = z.T @ y if cross is None else cross + z.T @ y
            target_energy += float(y.pow(2).sum())
    finally:
        handle.remove()
    old = o_proj.weight.detach().double().cpu()
    if has_bias:
        old = torch.cat([old, o_proj.bias.detach().double().cpu()[:, None]], dim=1)

    def loss(weight: torch.Tensor) -> float:  # sum ||W z - y||^2 from the moments, relative
        value = torch.einsum("oi,ij,oj->", weight, gram, weight) - 2 * torch.einsum("oi,io->", weight, cross)
        return (float(value) + target_energy) / max(target_energy, 1e-300)

    ridge = FIT_RIDGE * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
    fitted = torch.linalg.solve(gram + ridge, cross).T
    before, after = loss(old), loss(fitted)
    best = fitted if after < before else old
    weight, bias = (best[:, :-1], best[:, -1]) if has_bias else (best, None)
    return weight, bias, before, min(before, after)


def refine_attention(stream: LayerStream, layer: nn.Module, attention: nn.Module,
                     embeddings: list[tuple[torch.Tensor, torch.Tensor]], targets: list[torch.Tensor],
                     steps: int, lr: float) -> float:
    """A few Adam steps on this layer's attention weights against the source attention's outputs (the loss:
    relative squared error, one calibration batch per step, in turn). Returns the last step's loss."""
    attention.requires_grad_(True)
    optimizer = torch.optim.Adam(attention.parameters(), lr=lr)
    inputs = [layer.input_layernorm(hidden).detach() for hidden in stream.states]
    loss = torch.zeros(())
    for step in range(steps):
        index = step % len(inputs)
        cos, sin = embeddings[index]
        out = attention(inputs[index], position_embeddings=(cos, sin), attention_mask=stream.masks[index])[0]
        loss = (out.float() - targets[index].float()).pow(2).sum() / targets[index].float().pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    attention.requires_grad_(False)
    return float(loss.detach())


def convert_gqa(
    model: nn.Module,
    *,
    kv_lora_rank: int = 512,
    qk_rope_head_dim: int = 64,
    calibration: CalibrationInput = None,
    tokenizer: Any = None,
    num_groups: int | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rope_band_size: int | Literal["auto"] = "auto",
    rope_allocation: RopeAllocation = "freqfold",
    sequential: bool = True,
    fit_output: bool = True,
    fit_steps: int = 0,
    fit_lr: float = 1e-4,
    balance: Literal["auto", "rms"] = "auto",
    _latent_basis: LatentBasis = "pca",
) -> nn.Module:
    """TransGQLA of a Llama / Qwen2 / Mistral model; see ``gqla_compile.convert``.

    Layer by layer: the attention inputs of layer i come from the model whose layers before i are already
    converted (``sequential``; else from the source), their moment gives the RoPE step and the balanced joint
    PCA, then (``fit_output``) o_proj is refitted by least squares to the source attention's output on the same
    inputs, and (``fit_steps``) refined by a few Adam steps.
    """
    shape = check_gqa_model(model)
    check_ranks(shape, kv_lora_rank, qk_rope_head_dim, num_groups)
    if balance not in ("auto", "rms"):
        raise ConversionError(f"unknown balance {balance!r}; use 'auto' or 'rms'")
    if rope_allocation not in ("freqfold", "energy"):
        raise ConversionError(f"unknown rope_allocation {rope_allocation!r}; use 'freqfold' or 'energy'")
    out_dtype = _as_dtype(dtype, model)
    sliding_window_dropped = _warn_sliding_window(model.config)
    sequences = prepare_calibration(calibration, vocab_size=model.config.vocab_size, tokenizer=tokenizer, seed=seed)
    layers = model.model.layers
    has_qkv_bias = any(getattr(layers[0].self_attn, name).bias is not None for name in _ATTENTION_PROJECTIONS)

    energy_counts = None
    if rope_allocation == "energy":
        moments, _ = collect_attention_input_moments(model, sequences, batch_size=batch_size, progress=progress)
        eigvals = [rorope_rotation(frequency_energy(augmented_weight(layer.self_attn.k_proj), moment, shape))[0]
                   for layer, moment in zip(layers, moments)]
        energy_counts = allocate_rope_frequencies(torch.stack(eigvals), qk_rope_head_dim)

    was_training = model.training
    model.eval()
    builder = _LayerBuilder(model, shape, kv_lora_rank, qk_rope_head_dim, has_qkv_bias)
    generator = torch.Generator().manual_seed(seed)
    stream = LayerStream(model, sequences, batch_size)
    attention: dict[str, torch.Tensor] = {}
    records, tables = [], []
    try:
        for index in tqdm(range(len(layers)), desc="TransGQLA", unit="layer", disable=not progress):
            layer = layers[index]
            with torch.no_grad():
                moment = attention_input_moment(stream.states, layer.input_layernorm)
                targets = [out for _, out in stream.attention_outputs(layer, layer.self_attn)]
            k_aug = augmented_weight(layer.self_attn.k_proj)
            if energy_counts is not None:
                eigvals, eigvecs = rorope_rotation(frequency_energy(k_aug, moment, shape))
                candidates = [energy_ranked_rope(eigvals, eigvecs, energy_counts, shape)]
            else:
                candidates = rope_candidates(k_aug, moment, shape, qk_rope_head_dim, rope_band_size)
            choose = len(candidates) > 1 or balance == "auto"

            def candidate(rope: RopeChoice, alpha: float | None) -> tuple[float, RopeChoice, LayerConversion, Any, Any]:
                conversion = build_layer_weights(layer.self_attn, moment, rope, shape, kv_lora_rank,
                                                 basis=_latent_basis, generator=generator, alpha=alpha)
                module, embeddings = builder.attention(index, conversion.tensors), builder.embeddings(rope, stream)
                error = output_error(stream, layer, module, embeddings, targets[:CHOICE_BATCHES]) if choose else 0.0
                return error, rope, conversion, module, embeddings

            built = [candidate(rope, None) for rope in candidates]
            best = min(built, key=lambda item: item[0])
            record = {"band_size": best[1].band_size,
                      "band_errors": {str(b[1].band_size): b[0] for b in built} if len(built) > 1 else {}}
            if balance == "auto":  # the chosen band's balance, scaled, against the default one
                scaled = [candidate(best[1], best[2].alpha * scale) for scale in BALANCE_SCALES]
                record["balance_errors"] = {"1": best[0], **{str(s): c[0] for s, c in zip(BALANCE_SCALES, scaled)}}
                best = min([best, *scaled], key=lambda item: item[0])
            _, rope, conversion, module, embeddings = best
            record = {**conversion.record, **record}
            if fit_output:
                weight, bias, before, after = fit_output_projection(stream, layer, module, embeddings, targets)
                with torch.no_grad():
                    module.o_proj.weight.copy_(weight)
                    if bias is not None:
                        module.o_proj.bias.copy_(bias)
                record.update(output_error_before_fit=before, output_error_after_fit=after)
            if fit_steps:
                record["refine_loss"] = refine_attention(stream, layer, module, embeddings, targets, fit_steps, fit_lr)
            if fit_output or fit_steps:
                conversion.tensors.update({name: t.detach().double().cpu() for name, t in module.state_dict().items()})
            attention.update({f"model.layers.{index}.self_attn.{name}": t for name, t in conversion.tensors.items()})
            records.append(record)
            tables.append(rope.frequency_indices)
            if sequential:
                stream.advance(layer, module, embeddings)
            else:
                stream.advance(layer, layer.self_attn)
    finally:
        model.train(was_training)

    if not has_qkv_bias:
        attention = {name: t for name, t in attention.items() if not name.endswith(".bias") or ".o_proj." in name}
    conversion_record = {
        "method": "TransGQLA: RoRoPE/FreqFold, balanced joint PCA" + (", o_proj least squares" if fit_output else "")
                  + (f", {fit_steps} refinement steps" if fit_steps else ""),
        "source_architecture": type(model).__name__,
        "source_model_type": model.config.model_type,
        "source_num_key_value_heads": shape.n_kv,
        "source_head_dim": shape.d_h,
        "kv_lora_rank": kv_lora_rank,
        "qk_rope_head_dim": qk_rope_head_dim,
        "rope_allocation": rope_allocation,
        "rope_band_size": rope_band_size,
        "sequential": sequential,
        "fit_output": fit_output,
        "fit_steps": fit_steps,
        "balance": balance,
        "latent_basis": _latent_basis,
        "calibration": {"source": "random tokens" if calibration is None else "given",
                        "num_sequences": len(sequences), "num_tokens": stream.num_tokens, "seed": seed},
        "sliding_window_dropped": sliding_window_dropped,
        "layers": records,
    }
    config = gqla_config_for(
        model.config, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim, rope_frequency_indices=tables,
        attention_bias=has_qkv_bias, attention_output_bias=layers[0].self_attn.o_proj.bias is not None,
        conversion=conversion_record,
    )
    logger.info("TransGQLA: %d layers, mean kept key energy under RoPE %.3f, mean kept latent energy %.3f",
                len(records), sum(r["rope_kept_energy"] for r in records) / len(records),
                sum(r["latent_kept_energy"] for r in records) / len(records))
    return assemble_model(model, config, attention, out_dtype)
