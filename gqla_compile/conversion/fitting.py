"""Choosing and fitting one converted GQA layer on calibration data: the converted attention built runnable
(in the source's dtype and device), its attention-output error against the source's, the least-squares
o_proj and the optional Adam refinement."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_gqla import GqlaAttention, GqlaRotaryEmbedding
from .calibration import LayerStream
from .gqa_source import GqaShape, gqla_config_for
from .rope_allocation import RopeChoice

__all__ = ["LayerBuilder", "output_error", "fit_output_projection", "refine_attention", "FIT_RIDGE"]

# Relative ridge of the o_proj least squares (the pre-o_proj activations of a narrow latent are rank-deficient).
FIT_RIDGE = 1e-6


class LayerBuilder:
    """Turns one layer's float64 tensors into a runnable ``GqlaAttention`` (in the source's dtype and device) and
    its rotary cos/sin per calibration batch: what choosing, fitting and the sequential stream run."""

    def __init__(self, source: nn.Module, shape: GqaShape, kv_lora_rank: int, qk_rope_head_dim: int,
                 has_qkv_bias: bool) -> None:
        self.config = gqla_config_for(
            source.config, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
            rope_frequency_indices=[p % shape.n_freq for p in range(qk_rope_head_dim // 2)],
            attention_bias=has_qkv_bias, attention_output_bias=source.model.layers[0].self_attn.o_proj.bias is not None,
        )
        self.config._attn_implementation = "sdpa"
        self.dtype = next(source.parameters()).dtype
        self.device = next(source.parameters()).device

    def attention(self, index: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        module = GqlaAttention(self.config, index)
        module.load_state_dict({name: t for name, t in tensors.items()
                                if not name.endswith(".bias") or self.config.attention_bias or name.startswith("o_proj")},
                               strict=True)
        return module.to(device=self.device, dtype=self.dtype).eval()

    def embeddings(self, rope: RopeChoice, stream: LayerStream) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rotary = GqlaRotaryEmbedding(self.config, frequency_indices=rope.frequency_indices).to(self.device)
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
