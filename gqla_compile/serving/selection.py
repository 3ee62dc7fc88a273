"""Which decoding path a vLLM engine serves a GQLA checkpoint on, decided once at load time.

``hf_overrides={"gqla_path": ...}`` (vLLM copies it onto the model config) or the environment variable
``GQLA_PATH`` forces "absorbed" or "grouped"; "auto" (the default) asks the project's cost model
(``gqla_compile.plan``) for the chip vLLM runs on (``targets.resolve("auto")``: the CUDA device's name
mapped to a known target, else the measured CPU), with the engine's batch (``max_num_seqs``), its tokens
per step (1 + speculative tokens), its longest context (``max_model_len``) and its tensor-parallel size.
No vLLM import here: the engine's settings come in as an ``EngineShape``.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..cost_model import plan
from ..dims import LatentDims
from ..errors import GqlaServingError
from ..exporting import FORMATS as EXPORT_FORMATS
from ..paths import PATHS, feasible_paths

logger = logging.getLogger(__name__)

SERVED_RECORD = "gqla_serving"  # the config attribute the engine set-up records its decision in
PATH_OVERRIDE = "gqla_path"  # the hf_overrides key
PATH_ENV = "GQLA_PATH"
CHOICES = ("auto", *PATHS)


@dataclass(frozen=True)
class EngineShape:
    """What the path choice needs to know about the engine."""

    tp: int
    max_num_seqs: int
    tokens_per_step: int
    max_model_len: int
    dtype: Any
    target: Any = "auto"  # a target name or Target; "auto": this machine's GPU by name, else the measured CPU


@dataclass(frozen=True)
class PathChoice:
    path: str
    reason: str


def requested_path(config: Any) -> tuple[str, str]:
    """The path asked for and who asked: hf_overrides first, then the environment, else "auto"."""
    value, source = getattr(config, PATH_OVERRIDE, None), f'hf_overrides["{PATH_OVERRIDE}"]'
    if value is None:
        value, source = os.environ.get(PATH_ENV), f"${PATH_ENV}"
    if value is None:
        return "auto", "default"
    name = str(value).strip().lower()
    if name not in CHOICES:
        raise GqlaServingError(f"{source} = {value!r} is not a GQLA decoding path; use one of "
                               f"{', '.join(map(repr, CHOICES))}")
    return name, source


def choose_path(config: Any, engine: EngineShape, backend_problems: dict[str, str | None],
                served_sizes: dict[str, dict[str, int]] | None = None) -> PathChoice:
    """Pick the path for ``config`` on ``engine``; raise ``GqlaServingError`` naming the fix when the asked
    path cannot be served. ``backend_problems``: per path, why the attention backend cannot run it (or None).
    ``served_sizes``: per path, the config dims as the backend serves them (padding), which the cost model
    prices."""
    asked, source = requested_path(config)
    dims = LatentDims.from_config(config)
    problems = {name: backend_problems.get(name) or shard
                for name, shard in feasible_paths(dims, engine.tp).items()}
    if asked != "auto":
        if problems[asked] is not None:
            servable = [p for p in PATHS if p != asked and problems[p] is None]
            hint = "".join(f"; or serve the {p} path (hf_overrides={{'{PATH_OVERRIDE}': '{p}'}})" for p in servable)
            raise GqlaServingError(f"GQLA path {asked!r} was forced by {source} but cannot be served: "
                                   f"{problems[asked]}{hint}")
        return PathChoice(asked, f"forced by {source} (n_g={dims.n_g} of n_h={dims.n_h}, tp={engine.tp})")
    feasible = [p for p in PATHS if problems[p] is None]
    if not feasible:
        raise GqlaServingError("no GQLA path can be served here: "
                               + "; ".join(f"{p}: {why}" for p, why in problems.items()))
    if len(feasible) == 1:
        (only,) = feasible
        return PathChoice(only, "the only servable path (" + "; ".join(
            f"{p}: {why}" for p, why in problems.items() if why is not None) + ")")
    plans = {p: _plan_served(config, (served_sizes or {}).get(p, {}), p, engine) for p in feasible}
    seconds = {p: plans[p].costs[p].time_s for p in feasible}
    ranked = sorted(feasible, key=lambda p: seconds[p])  # stable, PATHS order: ties go to the smaller cache
    best, other = ranked[0], ranked[1]
    return PathChoice(best, f"cost model on target {plans[best].target.name} at batch {engine.max_num_seqs}, "
                            f"{engine.tokens_per_step} token(s) per step, context {engine.max_model_len}, tp "
                            f"{engine.tp}, sizes as served: predicted step {seconds[best] * 1e3:.3g} ms vs "
                            f"{seconds[other] * 1e3:.3g} ms on the {other} path ({best}: "
                            f"{plans[best].costs[best].bound}-bound, {other}: {plans[other].costs[other].bound}-bound)")


def _plan_served(config: Any, sizes: dict[str, int], path: str, engine: EngineShape) -> Any:
    """The cost model's plan for ``path`` with the config's dims replaced by the served ``sizes``."""
    view = copy.copy(config)
    for name, value in sizes.items():
        setattr(view, name, value)
    return plan(view, engine.target, s_q=engine.tokens_per_step, batch_size=engine.max_num_seqs,
                context_len=engine.max_model_len, tp=engine.tp, dtype=engine.dtype, rope_key="copied")


def is_regrouped(config: Any) -> bool:
    """True for a family checkpoint that ``convert(..., num_groups=G)`` left with fewer groups than heads.
    An export (``gqla_compile.export``, which records its format as the output) is written for stock
    engines, so vLLM's own classes serve it, plugin or not."""
    record = getattr(config, "gqla_conversion", None) or {}
    return ("num_groups" in record and record.get("output") not in EXPORT_FORMATS
            and LatentDims.from_config(config).n_g < config.num_attention_heads)


def serves_gqla(config: Any) -> bool:
    """True for the checkpoints the GQLA layers serve: model_type "gqla" and regrouped family checkpoints."""
    return getattr(config, "model_type", None) == "gqla" or is_regrouped(config)
