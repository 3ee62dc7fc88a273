"""Healing after a lossy conversion: distil the source model (teacher) into the converted one (student).

The loss is the KL divergence of the student's next-token distribution from the teacher's (optionally plus a
relative squared error between their per-layer hidden states), minimized with AdamW over the attention weights
only by default, with linear warm-up and cosine decay. Batches are a pure function of (seed, step), and the
models run in eval mode (no dropout), so a run resumed from a checkpoint takes exactly the steps of an
uninterrupted one. Checkpoints hold the trainable tensors and the optimizer's moments (safetensors) and a small
JSON state, written to a temporary folder and renamed into place. The state records fingerprints of the run's
inputs (the student's starting weights, the teacher's weights, the token windows): a checkpoint is resumed only
by the run it belongs to, never into another model that happens to have the same tensor names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import save_pretrained_atomic
from .errors import HealError

logger = logging.getLogger(__name__)

__all__ = ["HealConfig", "HealResult", "heal", "distillation_loss"]

Trainable = Literal["attention", "all"]
STATE_FILE = "heal_state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass(frozen=True)
class HealConfig:
    """The hyper-parameters of a healing run (a checkpoint is resumed only under the same ones)."""

    steps: int = 1000
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    temperature: float = 1.0
    hidden_weight: float = 0.0
    trainable: Trainable = "attention"
    seed: int = 0


@dataclass
class HealResult:
    """What a healing run did: its losses per step (this process's steps only when resumed) and where it stopped."""

    step: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0


def _token_windows(texts: Sequence[Any], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """[N, seq_len] windows of one token stream made of all texts (strings need ``tokenizer``; else token ids)."""
    stream: list[int] = []
    for text in texts:
        if isinstance(text, str):
            if tokenizer is None:
                raise HealError("healing texts are strings: pass tokenizer=")
            stream.extend(tokenizer(text)["input_ids"])
        else:
            stream.extend(int(t) for t in torch.as_tensor(text).flatten())
    count = len(stream) // seq_len
    if count == 0:
        raise HealError(f"healing texts give {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def batch_indices(step: int, num_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices of ``step``'s batch: epoch e walks a permutation seeded by (seed, e); a function of step only."""
    per_epoch = max(num_windows // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size] if num_windows >= batch_size else order


def lr_factor(step: int, config: HealConfig) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distillation_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, *, temperature: float = 1.0,
                      hidden_weight: float = 0.0) -> torch.Tensor:
    """KL(teacher || student) per token at ``temperature`` (times T^2), plus ``hidden_weight`` times the mean over
    layers of ||h_s - h_t||^2 / ||h_t||^2 when asked."""
    want_hidden = hidden_weight > 0
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
    output = student(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
    vocab = output.logits.shape[-1]
    log_p_student = torch.log_softmax(output.logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(target.logits.float().reshape(-1, vocab) / temperature, dim=-1)
    loss = nn.functional.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    loss = loss * temperature**2
    if want_hidden:
        pairs = list(zip(output.hidden_states[1:], target.hidden_states[1:]))
        hidden = sum((s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum() for s, t in pairs) / len(pairs)
        loss = loss + hidden_weight * hidden
    return loss


def trainable_parameters(model: nn.Module, trainable: Trainable) -> dict[str, nn.Parameter]:
    """The parameters healing updates: those of every ``self_attn`` module, or all."""
    if trainable not in ("attention", "all"):
        raise HealError(f"trainable={trainable!r}: use 'attention' or 'all'")
    named = dict(model.named_parameters())
    chosen = named if trainable == "all" else {n: p for n, p in named.items() if ".self_attn." in n}
    if not chosen:
        raise HealError("the model has no attention parameters (no '.self_attn.' modules) to heal")
    return chosen


class _Checkpoint:
    """The files of one healing checkpoint; ``save_pretrained`` so that the atomic folder writer can write it."""

    def __init__(self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, state: dict[str, Any]):
        self.params, self.optimizer, self.state = params, optimizer, state

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({name: p.detach().contiguous().cpu() for name, p in self.params.items()}, folder / WEIGHTS_FILE)
        moments = {}
        for name, param in self.params.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                moments[f"{name}::{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
        save_file(moments, folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps(self.state, indent=2) + "\n")


#: Elements of each tensor a fingerprint reads (evenly spaced): cheap on a large teacher, and two different
#: models (or one model before and after training) differ at nearly every element.
FINGERPRINT_SAMPLES = 65536


def fingerprint(tensors: dict[str, torch.Tensor], samples: int | None = FINGERPRINT_SAMPLES) -> str:
    """A digest of named tensors: names, shapes, dtypes and an evenly spaced sample of their values (all of
    them with ``samples=None``)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        flat = tensor.reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples) if samples else 1].to("cpu", copy=True).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()


def _run_fingerprints(params: dict[str, nn.Parameter], teacher: nn.Module, windows: torch.Tensor) -> dict[str, str]:
    """What a checkpoint must have been trained from to be resumed by this run."""
    return {"student": fingerprint(dict(params)), "teacher": fingerprint(dict(teacher.state_dict())),
            "windows": fingerprint({"windows": windows}, samples=None)}


def _check_checkpoint_folder(folder: Path) -> None:
    """Refuse a folder that exists but holds no healing checkpoint: saving would replace the user's files."""
    if folder.exists() and not (folder / STATE_FILE).is_file() and (not folder.is_dir() or any(folder.iterdir())):
        raise HealError(f"checkpoint folder {str(folder)!r} exists and holds no healing checkpoint "
                        f"({STATE_FILE}); it would be replaced: name a new or empty folder")


def _resume(folder: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
            config: HealConfig, fingerprints: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Load a checkpoint into the parameters and optimizer; the step it stopped at, and the fingerprints the run
    keeps recording (those it started with).

    The student may be where the run started (a new process, from the converted model) or where the checkpoint
    stopped (the same model healed on in stages); the teacher and the windows must be the run's."""
    from safetensors.torch import load_file

    state = json.loads((folder / STATE_FILE).read_text())
    if state["config"] != asdict(config):
        raise HealError(f"checkpoint {str(folder)!r} was written with other settings {state['config']}; "
                        "use the same settings or another checkpoint folder")
    weights = load_file(folder / WEIGHTS_FILE)
    if set(weights) != set(params):
        raise HealError(f"checkpoint {str(folder)!r} holds other tensors than this model's trainable ones")
    recorded = state.get("fingerprints", {})
    differing = [name for name in fingerprints if recorded.get(name) != fingerprints[name]
                 and not (name == "student" and fingerprint(weights) == fingerprints[name])]
    if differing:
        raise HealError(f"checkpoint {str(folder)!r} belongs to another run (its {', '.join(differing)} "
                        "differ from this run's); resuming would load another model's weights: use another "
                        "checkpoint folder or delete this one")
    moments = load_file(folder / OPTIMIZER_FILE)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
            saved = {key.split("::", 1)[1]: value for key, value in moments.items() if key.split("::", 1)[0] == name}
            if saved:
                optimizer.state[param] = {key: value.to(param.device) if key != "step" else value
                                          for key, value in saved.items()}
    return int(state["step"]), recorded


def heal(
    model: nn.Module,
    teacher: nn.Module,
    texts: Sequence[Any],
    *,
    tokenizer: Any = None,
    config: HealConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    stop_after: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> HealResult:
    """Distil ``teacher`` into ``model`` (changed in place) on windows of ``texts``; see the module docstring.

    Args:
        model: the converted model (e.g. from ``gqla_compile.convert``); its attention weights are trained.
        teacher: the source model; only read.
        texts: strings (with ``tokenizer``) or token-id sequences, cut into ``config.seq_len`` windows.
        config: the hyper-parameters (``HealConfig()`` by default).
        checkpoint_dir: written every ``checkpoint_every`` steps and at the end; if it holds a checkpoint of the
            same settings, model, teacher and text, the run resumes from it (a checkpoint of another run, or a
            folder that holds something else, is refused).
        stop_after: stop (with a checkpoint) after this many steps in total, e.g. to split a run; the schedule
            still follows ``config.steps``.
        device: where to train (default: the model's device); the teacher is moved there too.
    """
    config = config or HealConfig()
    if config.steps <= 0 or config.batch_size <= 0 or config.seq_len <= 1:
        raise HealError(f"steps ({config.steps}), batch_size ({config.batch_size}) and seq_len ({config.seq_len}) "
                        "must be positive (seq_len at least 2)")
    windows = _token_windows(texts, tokenizer, config.seq_len)
    if device is not None:
        model.to(device)
        teacher.to(device)
    params = _train_only(model, config.trainable)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    checkpoints = _Checkpoints(Path(checkpoint_dir) if checkpoint_dir is not None else None, params, optimizer, config)
    start = checkpoints.resume(teacher, windows)
    end = min(config.steps, stop_after if stop_after is not None else config.steps)
    result = HealResult(step=start, resumed_from=start)
    model.eval()
    teacher.eval()
    try:
        for step in tqdm(range(start, end), desc="heal", unit="step", initial=start, total=end, disable=not progress):
            result.losses.append(_train_step(model, teacher, windows, optimizer, config, step))
            result.step = step + 1
            if checkpoint_every and result.step % checkpoint_every == 0 and result.step < end:
                checkpoints.save(result)
    finally:
        for param in params.values():
            param.requires_grad_(False)
    checkpoints.save(result)
    return result


def _train_only(model: nn.Module, trainable: str) -> dict[str, nn.Parameter]:
    """The parameters ``trainable`` names, the only ones that take gradients from now on."""
    params = trainable_parameters(model, trainable)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    return params


def _train_step(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, optimizer: torch.optim.Optimizer,
                config: HealConfig, step: int) -> float:
    """One optimizer step on step ``step``'s batch of windows, at the schedule's learning rate; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = config.lr * lr_factor(step, config)
    device = next(model.parameters()).device
    ids = windows[batch_indices(step, windows.shape[0], config.batch_size, config.seed)].to(device)
    loss = distillation_loss(model, teacher, ids, temperature=config.temperature, hidden_weight=config.hidden_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass
class _Checkpoints:
    """The run's checkpoint folder (None: no checkpoints): where it resumes from and what it saves."""

    folder: Path | None
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    config: HealConfig
    fingerprints: dict[str, str] = field(default_factory=dict)

    def resume(self, teacher: nn.Module, windows: torch.Tensor) -> int:
        """The step to start at: 0, or a checkpoint's step when the folder holds one of this very run."""
        if self.folder is None:
            return 0
        _check_checkpoint_folder(self.folder)
        self.fingerprints = _run_fingerprints(self.params, teacher, windows)
        if not (self.folder / STATE_FILE).is_file():
            return 0
        start, self.fingerprints = _resume(self.folder, self.params, self.optimizer, self.config, self.fingerprints)
        if start:
            logger.info("healing resumes at step %d from %s", start, self.folder)
        return start

    def save(self, result: HealResult) -> None:
        if self.folder is None:
            return
        state = {"step": result.step, "config": asdict(self.config), "fingerprints": self.fingerprints,
                 "last_loss": result.losses[-1] if result.losses else None}
        save_pretrained_atomic(_Checkpoint(self.params, self.optimizer, state), self.folder, force=True)
