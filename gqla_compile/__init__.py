"""gqla_compile: find latent attention (GQLA, MLA) in Hugging Face models and compile it to the decoding
path that fits the target chip.

    model = gqla_compile.optimize(model, target="h20")
    model.generate(...)
    print(gqla_compile.report(model))

Importing the package registers model_type "gqla" with transformers' Auto classes (so
``AutoModelForCausalLM.from_pretrained`` reads GQLA checkpoints); the other public names are imported
lazily (PEP 562), so the compiler, converters and report load only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from . import modeling_gqla as _modeling_gqla  # noqa: F401  registers model_type "gqla" with the Auto classes

# public name -> module that defines it
_PUBLIC = {
    "LatentDims": "dims",
    "kv_cache_elements": "cache_sizes",
    "GqlaConfig": "configuration_gqla",
    "GqlaForCausalLM": "modeling_gqla",
    "GqlaModel": "modeling_gqla",
    "convert": "conversion",
    "export": "exporting",
    "heal": "heal",
    "HealConfig": "heal",
    "Target": "targets",
    "plan": "cost_model",
    "Plan": "cost_model",
    "optimize": "pipeline",
    "report": "reporting",
    "Report": "reporting",
    "DecodePath": "paths",
    "PATHS": "paths",
    "register_path": "paths",
    "unregister_path": "paths",
    # the errors gqla_compile raises on purpose
    "GqlaError": "errors",
    "NoLatentAttentionError": "errors",
    "UnknownTargetError": "errors",
    "ShapeMismatchError": "errors",
    "ConversionError": "errors",
    "VerificationError": "errors",
    "PartialRewriteWarning": "errors",
    "NoLatentAttentionWarning": "errors",
    "CompileError": "errors",
    "HealError": "errors",
    "ReportError": "errors",
    "OutputExistsError": "errors",
    "GqlaServingError": "errors",
    "UnsafeCheckpointError": "errors",
    "ModelNotFoundError": "errors",
}
_SUBMODULES = {"targets", "passes", "dims", "cost_model", "conversion", "paths", "errors"}

__all__ = sorted([*_PUBLIC, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'gqla_compile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
