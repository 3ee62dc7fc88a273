"""TransGQLA: a GQA checkpoint (Llama, Qwen2, Mistral; MHA included) to a GQLA model (DESIGN.md section 1).

Per layer, with x~ = [x; 1] the attention input with a constant appended (so biases ride along as one more
weight column) and C = E[x~ x~^T] from calibration (see ``calibration.py``):

1. RoRoPE. For each rotary frequency i, the 2-D components (dims i and i + d_h/2) of the n_kv key heads are
   rotated by the eigenvectors U_i of their energy E_i. The same rotation on both components commutes with
   RoPE and is orthogonal, so scores are unchanged. The d_R/2 rotated pairs of most energy keep RoPE
   (the shared key k_R = R_S K); RoPE is dropped on the rest, the only lossy step before PCA: the no-RoPE
   key of group g becomes k^n_g = P_g (I - R_S^T R_S) K and its query is the original q_h (d_n = d_h).
   The query's RoPE part is q_R,h = R_S P_g^T q_h.
2. Balance: alpha = sqrt(E||k^n||^2 / E||V||^2), so that keys and values weigh alike in the PCA.
3. Joint PCA of Y = [k^n_g / alpha ; V_g]_g (uncentered, so biases pass through the latent's bias) to d_c:
   the down-projection is R_c^T W_Y, the up-projection per group [alpha R_c(keys of g) ; R_c(values of g)].
4. softmax_scale keeps the source's d_h^-0.5; everything outside attention is copied.

All arithmetic is float64 on CPU. Weight matrices here are "augmented": [out, D + 1], bias in the last column.
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
from .calibration import CalibrationInput, DEFAULT_BATCH_SIZE, collect_attention_input_moments, prepare_calibration
from .common import model_wide_config_fields

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GqaShape",
    "convert_gqa",
    "check_gqa_model",
    "frequency_energy",
    "rorope_rotation",
    "allocate_rope_frequencies",
    "rope_key_rows",
    "query_weights",
    "nope_key_weights",
    "balance_alpha",
    "stack_compression_targets",
    "joint_pca",
    "build_layer_weights",
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


# --- RoRoPE -------------------------------------------------------------------------------------------------


def frequency_energy(k_aug: torch.Tensor, moment: torch.Tensor, shape: GqaShape) -> torch.Tensor:
    """E_i = E[a_i a_i^T + b_i b_i^T] per frequency i: [n_freq, n_kv, n_kv].

    a_i / b_i stack dim i / i + d_h/2 of every key head. Pre-RoPE keys suffice: RoPE rotates (a_i, b_i) of all
    heads by the same angle, which leaves this sum unchanged.
    """
    heads = k_aug.view(shape.n_kv, shape.d_h, -1)
    first, second = heads[:, : shape.n_freq], heads[:, shape.n_freq :]
    return sum(torch.einsum("gie,ef,hif->igh", part, moment, part) for part in (first, second))


def rorope_rotation(energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [n_freq, n_kv] (descending) and eigenvectors U [n_freq, n_kv, n_kv] (columns) of each E_i.

    Rotated component (i, j) = U_i[:, j]^T a_i (and likewise b_i) carries energy eigenvalue (i, j). Damping
    E_i by a multiple of the identity would not change U_i, so none is added.
    """
    eigvals, eigvecs = torch.linalg.eigh(energy)
    return eigvals.flip(-1).clamp_min(0.0), eigvecs.flip(-1)


def allocate_rope_frequencies(eigvals: torch.Tensor, qk_rope_head_dim: int) -> list[int]:
    """How many rotated pairs of each frequency keep RoPE, shared by all layers: counts [n_freq].

    ``eigvals`` is [L, n_freq, n_kv] (descending in the last dim). The GQLA config has one frequency list for
    all layers, so every layer keeps the top-m_i components of frequency i with the same m_i. The m_i
    maximize the kept share of each layer's key energy summed over layers: gains are non-increasing in j, so
    taking the d_R/2 largest summed shares (ties to lower j) picks prefixes and is optimal.
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


def rope_key_rows(eigvecs: torch.Tensor, counts: list[int], shape: GqaShape) -> torch.Tensor:
    """R_S [d_R, n_kv d_h]: the kept rotated components, in rotate_half layout.

    Row p (pair p's first component) combines dim i of every head with weights U_i[:, j]; row p + d_R/2 the
    same for dim i + d_h/2. Rows are orthonormal.
    """
    pairs = [(i, j) for i, count in enumerate(counts) for j in range(count)]
    half = len(pairs)
    rows = torch.zeros(2 * half, shape.n_kv, shape.d_h, dtype=torch.float64)
    for p, (i, j) in enumerate(pairs):
        rows[p, :, i] = eigvecs[i, :, j]
        rows[p + half, :, i + shape.n_freq] = eigvecs[i, :, j]
    return rows.view(2 * half, shape.key_width)


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
    eigvals: torch.Tensor,
    eigvecs: torch.Tensor,
    counts: list[int],
    shape: GqaShape,
    kv_lora_rank: int,
    *,
    basis: LatentBasis = "pca",
    generator: torch.Generator | None = None,
) -> LayerConversion:
    """The GQLA attention tensors of one layer (float64), keyed by name below ``self_attn.``."""
    q_aug, k_aug, v_aug = (augmented_weight(getattr(attention, name)) for name in _ATTENTION_PROJECTIONS)
    rope_rows = rope_key_rows(eigvecs, counts, shape)
    k_nope = nope_key_weights(k_aug, rope_rows)
    alpha = balance_alpha(k_nope, v_aug, moment)
    w_y = stack_compression_targets(k_nope, v_aug, alpha, shape)
    r_c, latent_kept = joint_pca(w_y, moment, kv_lora_rank, basis=basis, generator=generator)

    up_scale = torch.cat([torch.full((shape.d_h,), alpha, dtype=torch.float64),
                          torch.ones(shape.d_h, dtype=torch.float64)]).repeat(shape.n_kv)
    q_weight, q_bias = split_augmented(query_weights(q_aug, rope_rows, shape))
    kv_a_weight, kv_a_bias = split_augmented(torch.cat([r_c.T @ w_y, rope_rows @ k_aug]))
    tensors = {
        "q_proj.weight": q_weight,
        "q_proj.bias": q_bias,
        "kv_a_proj_with_mqa.weight": kv_a_weight,
        "kv_a_proj_with_mqa.bias": kv_a_bias,
        "kv_b_proj.weight": up_scale[:, None] * r_c,
    }
    rope_kept = float(sum(eigvals[i, :count].sum() for i, count in enumerate(counts)) / eigvals.sum().clamp_min(1e-300))
    return LayerConversion(tensors=tensors, rope_kept_energy=rope_kept, latent_kept_energy=latent_kept, alpha=alpha)


# --- the model ----------------------------------------------------------------------------------------------


def gqla_config_for(
    source_config: Any,
    *,
    kv_lora_rank: int,
    qk_rope_head_dim: int,
    rope_frequency_indices: list[int],
    attention_bias: bool = False,
    attention_output_bias: bool = False,
    conversion: dict | None = None,
) -> GqlaConfig:
    """The GqlaConfig of a GQA source converted with these ranks (needs no weights)."""
    shape = GqaShape.from_config(source_config)
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
        rope_frequency_indices=list(rope_frequency_indices),
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
    _latent_basis: LatentBasis = "pca",
) -> nn.Module:
    """TransGQLA of a Llama / Qwen2 / Mistral model; see ``gqla_compile.convert``."""
    shape = check_gqa_model(model)
    check_ranks(shape, kv_lora_rank, qk_rope_head_dim, num_groups)
    out_dtype = _as_dtype(dtype, model)
    sliding_window_dropped = _warn_sliding_window(model.config)
    sequences = prepare_calibration(calibration, vocab_size=model.config.vocab_size, tokenizer=tokenizer, seed=seed)
    moments, n_tokens = collect_attention_input_moments(model, sequences, batch_size=batch_size, progress=progress)

    layers = model.model.layers
    energies = [frequency_energy(augmented_weight(layer.self_attn.k_proj), moment, shape)
                for layer, moment in zip(layers, moments)]
    rotations = [rorope_rotation(energy) for energy in energies]
    counts = allocate_rope_frequencies(torch.stack([eigvals for eigvals, _ in rotations]), qk_rope_head_dim)

    generator = torch.Generator().manual_seed(seed)
    attention: dict[str, torch.Tensor] = {}
    records = []
    for index in tqdm(range(len(layers)), desc="TransGQLA", unit="layer", disable=not progress):
        eigvals, eigvecs = rotations[index]
        layer = build_layer_weights(layers[index].self_attn, moments[index], eigvals, eigvecs, counts, shape,
                                    kv_lora_rank, basis=_latent_basis, generator=generator)
        attention.update({f"model.layers.{index}.self_attn.{name}": t for name, t in layer.tensors.items()})
        records.append(layer.record)

    attn = layers[0].self_attn
    has_qkv_bias = any(getattr(attn, name).bias is not None for name in _ATTENTION_PROJECTIONS)
    if not has_qkv_bias:
        attention = {name: t for name, t in attention.items() if not name.endswith(".bias")}
    conversion = {
        "method": "TransGQLA: RoRoPE, balanced joint PCA",
        "source_architecture": type(model).__name__,
        "source_model_type": model.config.model_type,
        "source_num_key_value_heads": shape.n_kv,
        "source_head_dim": shape.d_h,
        "kv_lora_rank": kv_lora_rank,
        "qk_rope_head_dim": qk_rope_head_dim,
        "latent_basis": _latent_basis,
        "calibration": {"source": "random tokens" if calibration is None else "given",
                        "num_sequences": len(sequences), "num_tokens": n_tokens, "seed": seed},
        "sliding_window_dropped": sliding_window_dropped,
        "layers": records,
    }
    config = gqla_config_for(
        model.config, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
        rope_frequency_indices=rope_frequency_indices(counts), attention_bias=has_qkv_bias,
        attention_output_bias=attn.o_proj.bias is not None, conversion=conversion,
    )
    logger.info("TransGQLA: %d layers, mean kept key energy under RoPE %.3f, mean kept latent energy %.3f",
                len(records), sum(r["rope_kept_energy"] for r in records) / len(records),
                sum(r["latent_kept_energy"] for r in records) / len(records))
    return assemble_model(model, config, attention, out_dtype)
