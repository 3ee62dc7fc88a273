"""Real text every machine has: the Python standard library's own ``.py`` sources.

Files are split deterministically (by a CRC of their path relative to the stdlib folder) into a calibration
part and a held-out evaluation part, so calibration never sees the text perplexity is measured on. Test
suites and vendored folders are skipped (they are large, repetitive and not always installed).
"""

from __future__ import annotations

import functools
import math
import os
import sysconfig
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

SKIPPED_FOLDERS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
EVAL_SHARE = 4  # one file in EVAL_SHARE goes to evaluation


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted by relative path (tests and vendored code left out)."""
    return list(_stdlib_files(sysconfig.get_paths()["stdlib"]))


@functools.lru_cache(maxsize=None)
def _stdlib_files(stdlib: str) -> tuple[Path, ...]:
    """The walk behind :func:`stdlib_files`, once per process: skipped folders are pruned, not walked (the
    stdlib folder may hold site-packages, with every installed package, which is most of what a full walk reads)."""
    root, files = Path(stdlib), []
    for folder, subfolders, names in os.walk(root):  # like rglob: symlinked folders are not entered
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_FOLDERS]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _is_eval_file(path: Path) -> bool:
    root = Path(sysconfig.get_paths()["stdlib"])
    return zlib.crc32(path.relative_to(root).as_posix().encode()) % EVAL_SHARE == 0


def stdlib_text(part: str, max_chars: int) -> str:
    """About ``max_chars`` characters of the "calibration" or "evaluation" part, whole files in path order."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")
    chunks, size = [], 0
    for path in stdlib_files():
        if _is_eval_file(path) != (part == "evaluation"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n\n".join(chunks)[:max_chars]


def byte_tokens(text: str) -> list[int]:
    """UTF-8 bytes as token ids (0-255): real text for tiny random models with a 256-token vocabulary."""
    return list(text.encode("utf-8"))


def windows(token_ids: Sequence[int], seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``seq_len`` tokens: [count, seq_len]."""
    ids = torch.as_tensor(list(token_ids[: seq_len * count]), dtype=torch.long)
    if ids.numel() < seq_len * count:
        raise ValueError(f"need {seq_len * count} tokens, the text gives {ids.numel()}")
    return ids.view(count, seq_len)


@torch.no_grad()
def perplexity(model: Callable, batches: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over [N, T] windows (each window scored on its own)."""
    total, count = 0.0, 0
    for start in range(0, batches.shape[0], batch_size):
        ids = batches[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)
