"""TransGQLA's RoPE step: which rotated key components keep RoPE, and at which frequency (RoRoPE, FreqFold,
or the energy ranking), and the query and key weights that follow from the choice.

Neighbouring rotary frequencies are folded into bands of b (a power of two); per band, the 2-D components
(dims i and i + d_h/2) of its b frequencies and n_kv key heads are rotated by the eigenvectors of their energy.
The same rotation on both components commutes with RoPE when b = 1 (and approximately within a band), so it
folds into k_proj and the query. The m = (d_R/2) b / (d_h/2) leading component pairs of every band keep RoPE;
RoPE is dropped on the rest (see gqa.py's module docs for the whole recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConversionError
from .gqa_source import GqaShape

__all__ = ["RopeChoice", "band_energy", "frequency_energy", "rorope_rotation", "rope_key_rows", "freqfold_band_sizes",
           "freqfold_rope", "allocate_rope_frequencies", "rope_frequency_indices", "energy_ranked_rope",
           "rope_candidates", "query_weights", "nope_key_weights"]


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


def query_weights(q_aug: torch.Tensor, rope_rows: torch.Tensor, shape: GqaShape) -> torch.Tensor:
    """New q_proj [n_h (d_h + d_R), D + 1]: per head, q_h itself (no-RoPE part) then R_S P_g^T q_h (RoPE part)."""
    q_heads = q_aug.view(shape.n_h, shape.d_h, -1)
    blocks = rope_rows.view(-1, shape.n_kv, shape.d_h).transpose(0, 1)  # [n_kv, d_R, d_h]: R_S P_g^T
    q_rope = torch.einsum("hrd,hde->hre", blocks[shape.group_of_heads()], q_heads)
    return torch.cat([q_heads, q_rope], dim=1).reshape(-1, q_aug.shape[1])


def nope_key_weights(k_aug: torch.Tensor, rope_rows: torch.Tensor) -> torch.Tensor:
    """(I - R_S^T R_S) W_K: the key dims left without RoPE, still per head block (row g*d_h + d is k^n_g[d])."""
    return k_aug - rope_rows.T @ (rope_rows @ k_aug)
