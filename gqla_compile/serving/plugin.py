"""The vLLM plugin: ``register()`` is the ``vllm.general_plugins`` entry point (``gqla`` in pyproject).

vLLM calls it in every process it starts (the API server, the engine core, each tensor-parallel worker),
before it reads a model config. It makes ``vllm serve DIR`` / ``LLM(model=DIR)`` load GQLA checkpoints
with no conversion step:

- ``GqlaConfig`` (model_type "gqla") is registered with transformers' AutoConfig (importing
  ``gqla_compile`` does that), so vLLM can read the config of a TransGQLA result;
- ``GqlaForCausalLM`` and the DeepSeek-V2/V3 architectures are registered with vLLM's ``ModelRegistry``
  as lazy "module:Class" strings (the models import vLLM only when a checkpoint needs them). The DeepSeek
  classes are subclasses of vLLM's own that change nothing unless the config says the checkpoint was
  regrouped by ``gqla_compile.convert(..., num_groups=G)`` with G below the head count;
- the correction of vLLM's CPU rotary op (``gqla_compile.serving.rope``) is installed, so stock DeepSeek
  layers apply RoPE correctly too (docs/vllm_cpu_rope_bug.md).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_MODELS = "gqla_compile.serving.models"
# architecture -> class in _MODELS
ARCHITECTURES = {
    "GqlaForCausalLM": "GqlaForCausalLM",
    "DeepseekV2ForCausalLM": "GqlaDeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "GqlaDeepseekV3ForCausalLM",
}
# model types whose vLLM view (MLA or not, head size, KV heads) follows the served path
MODEL_TYPES = ["gqla", "deepseek_v2", "deepseek_v3"]
_registered = False


def register() -> None:
    """Register the GQLA config and architectures with transformers and vLLM; idempotent, logs one line."""
    global _registered
    if _registered:
        return
    import gqla_compile  # noqa: F401  registers model_type "gqla" with transformers' Auto classes
    from vllm import ModelRegistry

    from . import config_hooks, rope

    for arch, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{_MODELS}:{cls}")
    config_hooks.install(list(ARCHITECTURES), MODEL_TYPES)
    _log_through_vllm()
    rope.install_rotary_fix()
    _registered = True
    logger.info("gqla_compile plugin: registered model_type 'gqla' and %s with vLLM; RoPE fix for vLLM's own "
                "layers installed (gqla_compile.serving.rope)", ", ".join(ARCHITECTURES))


class _ToVllmLog(logging.Handler):
    """Hands gqla_compile's records to vLLM's logger when they are emitted (vLLM may configure its handlers
    after the plugin loads)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def _log_through_vllm() -> None:
    """Show gqla_compile's INFO records where vLLM shows its own (vLLM configures only its "vllm" logger)."""
    ours = logging.getLogger("gqla_compile")
    if any(isinstance(h, _ToVllmLog) for h in ours.handlers):
        return
    ours.addHandler(_ToVllmLog())
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
    ours.propagate = False
