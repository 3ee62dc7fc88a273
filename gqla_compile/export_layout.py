"""Where a GQLA attention's latent and RoPE dims go in an exported DeepSeek-V3 checkpoint (``exporting``).

An export writes the latent in ``kv_lora_rank`` dims and the RoPE key in ``qk_rope_head_dim`` dims: either
GQLA's own sizes, or padded to the 512 + 64 that MLA kernels are built for (FlashMLA, vLLM's CPU MLA, which
refuses every other size). Padding is exact:

- latent: the down-projection (``kv_a_proj_with_mqa``) gains zero rows, the up-projection (``kv_b_proj``) zero
  columns. DeepSeek-V3's latent RMSNorm then averages over 512 dims instead of d_c, which alone would shrink
  the mean square by d_c / 512 and so weigh the epsilon 512 / d_c times more. Scaling the latent rows by
  t = sqrt(512 / d_c) keeps the mean square exactly as it was (eps included) and the gain is divided by t.
  The padded dims hold zeros, have zero gain and meet zero columns. (An inert latent norm, written for models
  without one, stays inert: the padded mean square is only smaller.)
- RoPE: DeepSeek-V3 rotates pair j of its interleaved RoPE dims at frequency j of one table (its
  ``rope_parameters`` at ``qk_rope_head_dim`` dims). GQLA pair p of layer i is written into the pair
  ``slots[i][p]`` of that table that turns at its own frequency (relative 1e-6); the other pairs are zero rows
  in the query and key projections. Layers may use different slots, so per-layer frequency tables
  (TransGQLA's FreqFold results) are exact whenever the one table holds every layer's frequencies. Tables
  tried, in order: the model's own ``rope_parameters`` at the export's dims (any rope type; a selection from
  a 64-dim table, as TransGQLA makes from 64-dim heads, lands in the same 64-dim table, and a plain d_R = 32
  RoPE takes the even pairs of 64 at its own theta); then, for a plain RoPE only, the theta whose table holds
  the selected frequencies at whole steps: rope_theta^(D g / F) for indices that are all multiples of g in
  an F-dim table, exported at D dims. Nothing else is guessed: a RoPE no table holds is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConversionError
from .rope_gqla import compute_gqla_inv_freq

__all__ = ["ENGINE_LATENT_DIM", "ENGINE_ROPE_DIM", "ExportLayout", "padded_layout", "rope_layout", "unpadded_layout"]

#: The latent and RoPE key sizes MLA kernels are built for (DeepSeek-V3's 512 + 64).
ENGINE_LATENT_DIM = 512
ENGINE_ROPE_DIM = 64
#: How close an exported pair's frequency must be to the GQLA pair's (relative; float32 tables).
FREQUENCY_RTOL = 1e-6


@dataclass(frozen=True)
class ExportLayout:
    """The exported latent and RoPE dims and where GQLA's go in them."""

    latent_dim: int  # exported kv_lora_rank
    rope_dim: int  # exported qk_rope_head_dim
    rope_parameters: dict[str, Any]
    slots: list[list[int]]  # per layer: the exported RoPE pair of each GQLA pair
    latent_scale: float  # factor on the latent rows of kv_a_proj_with_mqa (the norm's gain gets its inverse)
    source_latent_dim: int
    source_rope_dim: int

    @property
    def padded(self) -> bool:
        return (self.latent_dim, self.rope_dim) != (self.source_latent_dim, self.source_rope_dim)


def unpadded_layout(config: Any) -> ExportLayout:
    """GQLA's own latent and RoPE sizes; raises ConversionError when no DeepSeek-V3 table holds the RoPE."""
    return _layout(config, config.kv_lora_rank, config.qk_rope_head_dim)


def padded_layout(config: Any) -> ExportLayout:
    """The latent padded to ENGINE_LATENT_DIM and the RoPE key to ENGINE_ROPE_DIM; ConversionError when the
    model's dims are larger or no 64-dim DeepSeek-V3 table holds its RoPE frequencies."""
    d_c, d_r = config.kv_lora_rank, config.qk_rope_head_dim
    if d_c > ENGINE_LATENT_DIM or d_r > ENGINE_ROPE_DIM:
        raise ConversionError(
            f"the latent is {d_c} + {d_r} dims (kv_lora_rank + qk_rope_head_dim), larger than the "
            f"{ENGINE_LATENT_DIM} + {ENGINE_ROPE_DIM} that MLA kernels are built for, so it cannot be padded to "
            "it; export with pad_latent=False (engines with a fixed 512 + 64 MLA kernel will not load it)"
        )
    return _layout(config, ENGINE_LATENT_DIM, ENGINE_ROPE_DIM)


def _layout(config: Any, latent_dim: int, rope_dim: int) -> ExportLayout:
    parameters, slots = rope_layout(config, rope_dim)
    scale = math.sqrt(latent_dim / config.kv_lora_rank) if config.kv_a_layernorm else 1.0
    return ExportLayout(latent_dim, rope_dim, parameters, slots, scale, config.kv_lora_rank, config.qk_rope_head_dim)


def rope_layout(config: Any, rope_dim: int) -> tuple[dict[str, Any], list[list[int]]]:
    """DeepSeek-V3 ``rope_parameters`` at ``rope_dim`` dims and, per layer, the pair each GQLA pair goes to."""
    layers = [compute_gqla_inv_freq(config, "cpu", config.layer_frequency_indices(i))
              for i in range(config.num_hidden_layers)]
    frequencies = [inv_freq.double() for inv_freq, _ in layers]
    scaling = layers[0][1]
    tried = []
    for parameters in _candidate_parameters(config, rope_dim):
        table, table_scaling = deepseek_v3_inv_freq(config, parameters, rope_dim)
        tried.append(parameters)
        if not math.isclose(table_scaling, scaling, rel_tol=FREQUENCY_RTOL):
            continue
        slots = [_match(layer, table) for layer in frequencies]
        if all(layer is not None for layer in slots):
            return parameters, slots
    found = sorted({round(float(f), 6) for layer in frequencies for f in layer}, reverse=True)
    shown = ", ".join(map(str, found[:8])) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
    hint = (f"; pad_latent=True places them in a {ENGINE_ROPE_DIM}-dim table, which may hold them"
            if rope_dim < ENGINE_ROPE_DIM else "")
    raise ConversionError(
        f"no DeepSeek-V3 RoPE of {rope_dim} dims turns at the model's RoPE frequencies ({shown}; tried "
        f"rope_parameters {tried}): DeepSeek-V3 has one frequency table for every layer, built at "
        "qk_rope_head_dim dims, and none holds them all (a frequency selection, rope_frequency_indices / "
        f"rope_layer_frequency_indices, outside it, or a scaled rope type whose table changes with the dims){hint}. "
        "Serve this model with gqla_compile.optimize instead"
    )


def _candidate_parameters(config: Any, rope_dim: int) -> list[dict[str, Any]]:
    """The model's own rope_parameters, then (plain RoPE only) the theta that spaces its frequencies evenly."""
    own = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    own.pop("partial_rotary_factor", None)  # GQLA's table ignores it (rope_gqla.rope_config_view)
    candidates = [own]
    if own.get("rope_type", "default") == "default":
        table_dim = config.rope_frequency_dim or config.qk_rope_head_dim
        indices = {k for i in range(config.num_hidden_layers) for k in config.layer_frequency_indices(i)}
        step = math.gcd(*indices) or 1
        theta = float(own.get("rope_theta", 10000.0)) ** (rope_dim * step / table_dim)
        if not math.isclose(theta, float(own.get("rope_theta", 10000.0))):
            candidates.append({**own, "rope_theta": theta})
    return candidates


def deepseek_v3_inv_freq(config: Any, parameters: dict[str, Any], rope_dim: int) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (float64) and cos/sin scaling transformers' DeepSeek-V3 builds from these fields."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    view = DeepseekV3Config(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                            qk_rope_head_dim=rope_dim, max_position_embeddings=config.max_position_embeddings,
                            rope_parameters=dict(parameters), num_hidden_layers=1,
                            vocab_size=config.vocab_size, bos_token_id=None, eos_token_id=None)
    rotary = DeepseekV3RotaryEmbedding(view)
    return rotary.inv_freq.double(), float(rotary.attention_scaling)


def _match(frequencies: torch.Tensor, table: torch.Tensor) -> list[int] | None:
    """For each frequency, a distinct index of ``table`` holding it (relative FREQUENCY_RTOL), or None."""
    slots: list[int] = []
    for frequency in frequencies.tolist():
        close = [j for j, value in enumerate(table.tolist())
                 if j not in slots and abs(value - frequency) <= FREQUENCY_RTOL * abs(frequency)]
        if not close:
            return None
        slots.append(close[0])
    return slots
