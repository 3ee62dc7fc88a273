"""Calibration inputs and the activation statistics TransGQLA needs.

Everything the conversion computes from activations is a quadratic form of one matrix per layer: the
uncentered second moment of the attention input with a constant 1 appended, ``C = E[[x;1][x;1]^T]``
(x = hidden states after ``input_layernorm``). Keys, values and their biases are affine in x, so their
energies, cross-terms and PCA covariances all follow from C and the weights. So the hooks accumulate C in
float64 ((D+1)^2 numbers per layer) and never store activations.

TransGQLA of a GQA model goes layer by layer instead (``LayerStream``): it keeps the hidden states entering the
current layer for every calibration sequence (tokens x D, in the model's dtype), so that layer i can be
converted, fitted and checked on the inputs that the layers before it, converted or not, really produce.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConversionError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "prepare_calibration",
    "random_token_sequences",
    "token_chunks",
    "collect_attention_input_moments",
    "equal_length_batches",
    "padded_batches",
    "MOMENT_DAMPING",
    "causal_mask",
    "attention_input_moment",
    "LayerStream",
]

DEFAULT_NUM_SAMPLES = 64
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8
#: Relative ridge added to a second moment C (times mean(diag C)) before it is factored or its PCA taken: the
#: directions calibration never excited are still ranked by the weights' own energy (so a latent as wide as the
#: weights' rank reproduces them exactly on every input), and C^{1/2}, C^{-1/2} stay finite.
MOMENT_DAMPING = 1e-6

CalibrationInput = Sequence[torch.Tensor] | Sequence[Sequence[int]] | Sequence[str] | None


def random_token_sequences(
    vocab_size: int, num_samples: int = DEFAULT_NUM_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0
) -> list[torch.Tensor]:
    """``num_samples`` sequences of uniformly random token ids: a stand-in when no text is given."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    return list(ids)


def token_chunks(token_ids: Sequence[int], num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Up to ``num_samples`` consecutive, non-overlapping windows of ``seq_len`` tokens from one token stream.

    Windows are spread evenly over the stream (not just its start) so that a long text is sampled throughout.
    """
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    available = ids.numel() // seq_len
    if available == 0:
        raise ConversionError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    if available < num_samples:
        logger.warning("calibration text gives only %d sequences of %d tokens (%d asked)", available, seq_len, num_samples)
    starts = torch.linspace(0, available - 1, min(num_samples, available)).round().long().unique() * seq_len
    return [ids[start : start + seq_len] for start in starts.tolist()]


def _as_token_tensor(sequence: Any) -> torch.Tensor:
    ids = torch.as_tensor(sequence, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ConversionError(f"each calibration sequence must be a non-empty 1-D list of token ids, got shape {tuple(ids.shape)}")
    return ids


def prepare_calibration(
    calibration: CalibrationInput, *, vocab_size: int, tokenizer: Any = None, seed: int = 0
) -> list[torch.Tensor]:
    """Calibration as a list of 1-D token-id tensors.

    Accepts token-id tensors or lists, or strings with ``tokenizer``; None gives random token ids (seeded),
    with a warning: activations of random tokens are a poor model of real text.
    """
    if calibration is None:
        logger.warning(
            "no calibration data given: using %d sequences of %d random token ids. Conversion quality needs "
            "real text (pass calibration=[...] token ids or strings with tokenizer=)",
            DEFAULT_NUM_SAMPLES,
            DEFAULT_SEQ_LEN,
        )
        return random_token_sequences(vocab_size, seed=seed)
    calibration = list(calibration)
    if not calibration:
        raise ConversionError("calibration is empty; give at least one sequence (or None for random tokens)")
    if all(isinstance(item, str) for item in calibration):
        if tokenizer is None:
            raise ConversionError("calibration strings need a tokenizer: pass tokenizer=")
        sequences = [_as_token_tensor(tokenizer(text)["input_ids"]) for text in calibration]
    else:
        sequences = [_as_token_tensor(item) for item in calibration]
    too_big = [int(s.max()) for s in sequences if int(s.max()) >= vocab_size or int(s.min()) < 0]
    if too_big:
        raise ConversionError(f"calibration token id {too_big[0]} is outside the vocabulary [0, {vocab_size})")
    return sequences


@dataclass(frozen=True)
class Calibration:
    """How a conversion calibrates, as ``convert`` was asked: the data (None: seeded random tokens), the
    tokenizer for strings, the seed, the batch size and whether bars show progress."""

    data: CalibrationInput = None
    tokenizer: Any = None
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    progress: bool = True

    def sequences(self, vocab_size: int) -> list[torch.Tensor]:
        return prepare_calibration(self.data, vocab_size=vocab_size, tokenizer=self.tokenizer, seed=self.seed)

    def record(self, num_sequences: int, num_tokens: int) -> dict[str, Any]:
        """The calibration as the conversion record states it."""
        return {"source": "random tokens" if self.data is None else "given", "num_sequences": num_sequences,
                "num_tokens": num_tokens, "seed": self.seed}


def padded_batches(sequences: Sequence[torch.Tensor], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded with token 0 (masked out)."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = max(s.numel() for s in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : seq.numel()] = seq
            mask[row, : seq.numel()] = 1
        yield ids, mask


class _MomentAccumulator:
    """Sums [x;1][x;1]^T (float64) over the real tokens of the current batch, for one layer."""

    def __init__(self, hidden_size: int) -> None:
        self.sum = torch.zeros(hidden_size + 1, hidden_size + 1, dtype=torch.float64)
        self.count = 0
        self.token_mask: torch.Tensor | None = None  # set per batch; right padding is excluded

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        x = hidden.detach().to(device="cpu", dtype=torch.float64)
        x = x[self.token_mask.bool()] if self.token_mask is not None else x.reshape(-1, x.shape[-1])
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        self.sum += x.T @ x
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@contextmanager
def _attention_input_hooks(layers: Sequence[nn.Module], accumulators: Sequence[_MomentAccumulator]) -> Iterator[None]:
    handles = [
        layer.self_attn.register_forward_pre_hook(acc.hook, with_kwargs=True)
        for layer, acc in zip(layers, accumulators)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_attention_input_moments(
    model: nn.Module,
    sequences: Sequence[torch.Tensor],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Per layer, E[[x;1][x;1]^T] (float64, (D+1)^2) of the attention input; and the number of tokens seen.

    Runs the model itself (unchanged, in its own dtype) over the calibration batches with pre-hooks on each
    layer's ``self_attn``.
    """
    layers = model.model.layers
    accumulators = [_MomentAccumulator(model.config.hidden_size) for _ in layers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_batches = -(-len(sequences) // batch_size)
    try:
        with _attention_input_hooks(layers, accumulators):
            for ids, mask in tqdm(padded_batches(sequences, batch_size), total=n_batches, desc="calibration",
                                  unit="batch", disable=not progress):
                for acc in accumulators:
                    acc.token_mask = mask
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return [acc.mean() for acc in accumulators], accumulators[0].count


# --- layer by layer -------------------------------------------------------------------------------------------


def equal_length_batches(sequences: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """[B, T] token batches of sequences of one length each (no padding needed), in a fixed order."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for seq in sequences:
        by_length.setdefault(seq.numel(), []).append(seq)
    return [torch.stack(group[start : start + batch_size])
            for _, group in sorted(by_length.items()) for start in range(0, len(group), batch_size)]


def causal_mask(length: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive causal mask [1, 1, T, T] (0 on and below the diagonal, the dtype's minimum above)."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def attention_input_moment(states: Sequence[torch.Tensor], norm: nn.Module) -> torch.Tensor:
    """E[[x;1][x;1]^T] (float64) of x = norm(h) over every token of ``states`` ([B, T, D] batches)."""
    total, count = None, 0
    for hidden in states:
        x = norm(hidden).detach().to(device="cpu", dtype=torch.float64).reshape(-1, hidden.shape[-1])
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        total = x.T @ x if total is None else total + x.T @ x
        count += x.shape[0]
    return total / max(count, 1)


class LayerStream:
    """The hidden states entering one decoder layer, for every calibration batch, and what a layer needs to run
    on them (causal masks, the source's rotary cos/sin). Moving through the model one layer at a time lets each
    layer be converted on the inputs that the layers before it (converted or not) really produce.
    """

    def __init__(self, model: nn.Module, sequences: Sequence[torch.Tensor], batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.states: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.source_embeddings: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for ids in equal_length_batches(sequences, batch_size):
                hidden = model.model.embed_tokens(ids.to(self.device))
                positions = torch.arange(ids.shape[1], device=self.device)[None].expand(ids.shape[0], -1)
                self.states.append(hidden)
                self.positions.append(positions)
                self.masks.append(causal_mask(ids.shape[1], dtype, self.device))
                self.source_embeddings.append(model.model.rotary_emb(hidden, positions))

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.states)

    def attention_outputs(self, layer: nn.Module, attention: nn.Module,
                          embeddings: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                          limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(attention input x = input_layernorm(h), attention(x)) per batch (the first ``limit`` batches);
        ``embeddings`` are the cos/sin per batch (default: the source's)."""
        embeddings = self.source_embeddings if embeddings is None else embeddings
        for hidden, mask, embedding in list(zip(self.states, self.masks, embeddings))[:limit]:
            x = layer.input_layernorm(hidden)
            yield x, attention(x, position_embeddings=embedding, attention_mask=mask)[0]

    @torch.no_grad()
    def advance(self, layer: nn.Module, attention: nn.Module,
                embeddings: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Run the decoder ``layer`` (its norms and MLP, with ``attention`` in place of its own) on every batch."""
        outputs = self.attention_outputs(layer, attention, embeddings)
        for index, (hidden, (_, attended)) in enumerate(zip(list(self.states), outputs)):
            hidden = hidden + attended
            self.states[index] = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
