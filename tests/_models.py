"""Models and helpers shared by the compiler tests.

``HandWrittenLatentLM`` is a latent-attention language model written here and registered nowhere: its
class, module and parameter names match nothing in transformers, its RoPE is interleaved and computed
inside the block, and its attention is the eager matmul/softmax/matmul. Detection must find it from the
graph alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import DynamicCache


class HandWrittenLatentBlock(nn.Module):
    """MLA-style block with n_g groups: down-projection, RMS-normed latent, grouped up-projection."""

    def __init__(self, hidden=48, heads=6, groups=3, latent=20, rope=8, nope=12, value=10, index=0):
        super().__init__()
        self.heads, self.groups, self.latent, self.rope, self.nope, self.value = heads, groups, latent, rope, nope, value
        self.index = index
        self.wq = nn.Linear(hidden, heads * (nope + rope), bias=True)
        self.down = nn.Linear(hidden, latent + rope, bias=False)
        self.gain = nn.Parameter(torch.rand(latent) + 0.5)
        self.up = nn.Linear(latent, groups * (nope + value), bias=False)
        self.wo = nn.Linear(heads * value, hidden, bias=True)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Interleaved RoPE on pairs (2i, 2i + 1)."""
        freqs = 1.0 / (500.0 ** (torch.arange(0, self.rope, 2, dtype=torch.float32) / self.rope))
        angles = positions[:, None].float() * freqs[None, :]  # [T, rope/2]
        cos, sin = angles.cos(), angles.sin()
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def forward(self, hidden_states, positions, attention_mask=None, cache=None):
        b, t, _ = hidden_states.shape
        q = self.wq(hidden_states).reshape(b, t, self.heads, self.nope + self.rope).permute(0, 2, 1, 3)
        q_pass, q_rot = q[..., : self.nope], q[..., self.nope :]
        both = self.down(hidden_states)
        c = both[..., : self.latent]
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        k_rot = self.rotate(both[..., self.latent :], positions[0])
        q = torch.cat([q_pass, self.rotate(q_rot, positions[0])], dim=-1)
        c, k_rot = c.unsqueeze(1), k_rot.unsqueeze(1)
        if cache is not None:
            c, k_rot = cache.update(c, k_rot, self.index)
        s = c.shape[2]
        kv = self.up(c[:, 0]).reshape(b, s, self.groups, self.nope + self.value).permute(0, 2, 1, 3)
        k = torch.cat([kv[..., : self.nope], k_rot.expand(b, self.groups, s, self.rope)], dim=-1)
        v = kv[..., self.nope :]
        rep = self.heads // self.groups
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.nope + self.rope)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(b, t, self.heads * self.value)
        return self.wo(out)


class HandWrittenLatentLM(nn.Module):
    """Embedding, residual latent-attention blocks, head; called like a transformers causal LM."""

    def __init__(self, vocab=97, hidden=48, layers=2, **block):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(HandWrittenLatentBlock(hidden=hidden, index=i, **block) for i in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.vocab = vocab

    def forward(self, input_ids, cache=None, use_cache=False):
        x = self.embed(input_ids)
        t = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        positions = (torch.arange(t) + past)[None]
        mask = torch.full((t, past + t), float("-inf")).triu(past + 1)[None, None]
        for block in self.blocks:
            x = x + block(x, positions, attention_mask=mask, cache=cache)
        return self.head(x)


#: Every runtime cache layout: (path, rope_key). The RoPE key layout only matters on the grouped path.
LAYOUTS = [("absorbed", "copied"), ("grouped", "copied"), ("grouped", "shared")]


def expected_cache_elements(dims, path: str, rope_key: str, tp: int = 1) -> int:
    """Cached elements per token, layer and rank, written out from DESIGN.md's table (not from paths.py)."""
    if path == "absorbed":
        return dims.d_c + dims.d_R  # the whole latent on every rank
    groups = dims.n_g // tp
    if rope_key == "copied":
        return groups * (dims.d_n + dims.d_R + dims.d_v)
    return groups * (dims.d_n + dims.d_v) + dims.d_R  # k_R kept once on every rank


def randomize_biases_and_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero biases and norm gains (configs initialise them to 0 and 1), so that a bias added once
    per rank too many, a wrongly sliced bias or a lost norm changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
            elif "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
    return model


def attention_modules(model: nn.Module) -> list[str]:
    """The model's attention blocks, found independently of the compiler: transformers' ``*Attention``
    classes and the hand-written latent block."""
    return [name for name, module in model.named_modules()
            if "gqla_runtime" not in name  # the installed runtime itself (InstalledLatentAttention)
            and (type(module).__name__.endswith("Attention") or isinstance(module, HandWrittenLatentBlock))]


def assert_rewritten_for_real(model: nn.Module, path: str) -> None:
    """Every attention block's forward is the installed runtime, on the chosen path."""
    state = model.gqla_optimization
    modules = dict(model.named_modules())
    assert sorted(layer.module_path for layer in state.layers) == sorted(attention_modules(model))
    for layer in state.layers:
        module = modules[layer.module_path]
        assert module.forward == module.gqla_runtime.forward and module.gqla_runtime.path == path, layer.module_path


def assert_cache_layout(cache, model: nn.Module, batch: int, tokens: int) -> None:
    """Each layer's cached keys and values have the rewritten path's shapes (paths.DecodePath.cache_shapes):
    absorbed [B, 1, T, d_c + d_R] keys with zero-width values, grouped [B, n_g, T, d_n + d_R] and [B, n_g, T, d_v]
    with the RoPE key copied, [B, 1, T, n_g d_n + d_R] and [B, 1, T, n_g d_v] with it shared.

    Both shapes are checked: transformers' own MLA caches [B, 1, T, d_c] keys and [B, 1, T, d_R] values,
    the absorbed path's number of elements, so a size check alone could not tell them apart.
    """
    from gqla_compile.paths import PATHS

    state = model.gqla_optimization
    assert len(cache.layers) == len(state.layers)
    for layer, cached in zip(state.layers, cache.layers):
        key_shape, value_shape = PATHS[state.path].cache_shapes(layer.dims, batch, tokens, rope_key=state.plan.rope_key)
        assert tuple(cached.keys.shape) == key_shape, (layer.module_path, tuple(cached.keys.shape), key_shape)
        assert tuple(cached.values.shape) == value_shape, (layer.module_path, tuple(cached.values.shape), value_shape)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def teacher_forced_decode(model, tokens: torch.Tensor, prompt_len: int) -> list[torch.Tensor]:
    """Prefill ``prompt_len`` tokens, then feed the rest one at a time through a DynamicCache.

    Returns the logits of the prefill and of every decode step, so that two models can be compared on
    exactly the same inputs (a hand-written decode loop, as users write with ``cache=``).
    """
    cache = DynamicCache()
    steps = [logits_of(model(tokens[:, :prompt_len], cache=cache, use_cache=True))]
    for i in range(prompt_len, tokens.shape[1]):
        steps.append(logits_of(model(tokens[:, i : i + 1], cache=cache, use_cache=True)))
    return steps


def cache_elements(cache) -> int:
    """Every element the cache holds, summed over its layers' keys and values."""
    return sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
