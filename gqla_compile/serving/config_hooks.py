"""Engine set-up hooks: the path is decided once, in vLLM's main process, and vLLM's view of the model follows it.

vLLM sizes its KV cache and picks its scheduling from the model config before any layer exists (its
``use_mla``, head size and KV-head count; on CPU, MLA also turns chunked prefill off). So the choice runs in
vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``, called with the whole engine config), is logged
there in one line, and is recorded on the HF config (``selection.SERVED_RECORD``), which reaches every worker;
the architecture convertor (``MODEL_ARCH_CONFIG_CONVERTORS``) reads that record, so vLLM sees an MLA model
with the served latent on the absorbed path and n_g KV heads of the served head size on the grouped path.
Checkpoints that are neither GQLA nor regrouped are left exactly as vLLM sees them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.transformers_utils import model_arch_config_convertor as convertors

from ..dims import LatentDims
from ..paths import ServingLayout, get_path
from .selection import SERVED_RECORD, serves_gqla


class GqlaConfigHook:
    """``verify_and_update_config`` for the GQLA architectures (vLLM's ``VerifyAndUpdateConfig`` protocol)."""

    wrapped: Any = None  # vLLM's own hook for this architecture, if it has one

    @classmethod
    def verify_and_update_model_config(cls, model_config: Any) -> None:
        if cls.wrapped is not None:
            cls.wrapped.verify_and_update_model_config(model_config)

    @classmethod
    def verify_and_update_config(cls, vllm_config: Any) -> None:
        if cls.wrapped is not None:
            cls.wrapped.verify_and_update_config(vllm_config)
        model_config = vllm_config.model_config
        config = model_config.hf_config
        if not serves_gqla(config):
            return
        from .models import serving_plan

        plan = serving_plan(config, vllm_config)
        setattr(config, SERVED_RECORD, dataclasses.asdict(plan))
        model_config.model_arch_config = model_config.get_model_arch_config()


def hook_for(existing: Any) -> type[GqlaConfigHook]:
    """A hook class that runs ``existing`` (vLLM's own, or None) first."""
    return type("GqlaConfigHook", (GqlaConfigHook,), {"wrapped": existing})


class _ServedArchMixin:
    """What vLLM reads of the model follows the recorded path's serving layout (nothing changes before a path
    is recorded)."""

    def _served(self) -> tuple[dict, ServingLayout] | None:
        served = getattr(self.hf_config, SERVED_RECORD, None)
        if served is None:
            return None
        return served, get_path(served["path"]).serving_layout(LatentDims.from_config(self.hf_text_config))

    def is_deepseek_mla(self) -> bool:
        served = self._served()
        return super().is_deepseek_mla() if served is None else served[1].mla

    def get_head_size(self) -> int:
        served = self._served()
        return super().get_head_size() if served is None else served[0]["head_size"]

    def get_total_num_kv_heads(self) -> int:
        served = self._served()
        if served is None or served[1].mla:  # vLLM counts an MLA model's KV heads itself
            return super().get_total_num_kv_heads()
        return served[1].kv_heads


def served_convertor(model_type: str) -> type:
    """vLLM's convertor for ``model_type`` with ``_ServedArchMixin`` in front."""
    base = convertors.MODEL_ARCH_CONFIG_CONVERTORS.get(model_type, convertors.ModelArchConfigConvertorBase)
    if issubclass(base, _ServedArchMixin):
        return base
    return type(f"GqlaServed{base.__name__}", (_ServedArchMixin, base), {})


def install(architectures: list[str], model_types: list[str]) -> None:
    """Install the config hook for ``architectures`` and the convertor for ``model_types``; idempotent."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch in architectures:
        existing = MODELS_CONFIG_MAP.get(arch)
        if not (isinstance(existing, type) and issubclass(existing, GqlaConfigHook)):
            MODELS_CONFIG_MAP[arch] = hook_for(existing)
    for model_type in model_types:
        convertors.MODEL_ARCH_CONFIG_CONVERTORS[model_type] = served_convertor(model_type)
