"""Saving and loading checkpoints without losing anything a user owns.

Saving writes into a temporary folder beside the destination and renames it into place once complete, so
an interrupted save never leaves a half-written model, and an existing folder is replaced only when asked
(``force``) and only after the new one is complete. Loading reads safetensors only: pickle weights
(``*.bin``, ``*.pt``, ``*.pth``) can run code when unpickled, so a folder holding only those is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ModelNotFoundError, OutputExistsError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

__all__ = ["OutputExistsError", "UnsafeCheckpointError", "ModelNotFoundError", "save_pretrained_atomic", "load_model",
           "load_config"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def check_output_free(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """``out_dir`` as a Path; raise OutputExistsError if it exists and ``force`` is not set.

    Called before long work (a conversion) so that the user learns at once, and again before the rename.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputExistsError(f"output folder {str(out_dir)!r} already exists; pass --force (force=True) to replace it")
    return out_dir


def save_pretrained_atomic(model: Any, out_dir: str | os.PathLike, *, force: bool = False, tokenizer: Any = None) -> Path:
    """``model.save_pretrained`` (safetensors) and ``tokenizer.save_pretrained`` into ``out_dir``, atomically.

    The files are written into a temporary folder in the same parent (same file system, so the final
    rename is atomic); an existing ``out_dir`` is moved aside only once the new folder is complete, and
    deleted after the new one is in place. On any error the temporary folder is removed and ``out_dir``
    is left as it was.
    """
    out_dir = check_output_free(out_dir, force=force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _replace_folder(staging, check_output_free(out_dir, force=force))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s to %s", type(model).__name__, out_dir)
    return out_dir


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and deleted afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the user's folder back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def refuse_pickle_only(folder: Path) -> None:
    """Raise UnsafeCheckpointError if ``folder`` has pickle weights and no safetensors weights."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{str(folder)!r} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors first (e.g. load them yourself if you trust them and save_pretrained)"
        )


def _resolve(path_or_name: str | os.PathLike) -> tuple[Path | None, str]:
    """(model folder, or None for a tiny config name; the name): the one rule every command loads by."""
    from .tiny import TINY_CONFIGS

    name, folder = str(path_or_name), Path(path_or_name)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{name!r} is not a model folder: it has no config.json")
        return folder, name
    if name in TINY_CONFIGS:
        return None, name
    raise ModelNotFoundError(
        f"{name!r} is neither a local model folder nor a built-in tiny config ({', '.join(TINY_CONFIGS)})"
    )


def load_config(path_or_name: str | os.PathLike) -> Any:
    """The config of a local model folder or of a built-in tiny config name (nothing else is read)."""
    from transformers import AutoConfig

    from . import modeling_gqla  # noqa: F401  registers model_type "gqla"
    from .tiny import TINY_CONFIGS

    folder, name = _resolve(path_or_name)
    return TINY_CONFIGS[name]() if folder is None else AutoConfig.from_pretrained(folder)


def load_model(path_or_name: str | os.PathLike, *, dtype: torch.dtype | str | None = None) -> Any:
    """A causal LM from a local folder (safetensors only) or a built-in tiny config name (random weights, seed 0).

    ``dtype`` None keeps the checkpoint's dtype (float32 for tiny configs). The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    from . import modeling_gqla  # noqa: F401  registers model_type "gqla"
    from .tiny import TINY_CONFIGS

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    folder, name = _resolve(path_or_name)
    if folder is not None:
        refuse_pickle_only(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=dtype or "auto")
        return model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    return model.to(dtype or torch.float32).eval()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(folder: str | os.PathLike | None) -> Any:
    """The tokenizer saved in ``folder``, or None when there is none (the commands' one tokenizer loader)."""
    folder = Path(folder) if folder is not None else None
    if folder is None or not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
