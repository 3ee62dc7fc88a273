"""``optimize``: capture -> detect -> plan -> rewrite (fold, absorb or expand) -> install -> Inductor.

Each arrow is one module (capture.py, passes/detect.py, cost_model.py, passes/{split,fold,absorb,expand}.py,
runtime.py, compile.py); this file only wires them and keeps the records the report is built from.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .capture import CAPTURE_METHOD, CapturedAttention, capture_attention_candidates
from .dims import LatentDims, is_latent_config, latent_cache_elements
from .distributed import TensorParallel, tensor_parallel_group
from .errors import GqlaError, NoLatentAttentionError
from .passes.absorb import AbsorbQuery
from .passes.detect import DetectLatentAttention, LatentAttentionMatch, probe_up_projections
from .passes.expand import ExpandNewTokens
from .passes.fold import fold_value_up_projection, stack_group_up_projections
from .passes.manager import PassManager, PassRecord
from .passes.shard import REPLICATED, ShardAttention, TensorParallelLayout, shard_problem
from .passes.split import SplitLatentProjection
from .runtime import InstalledLatentAttention, LatentAttentionCore, install, uninstall

logger = logging.getLogger(__name__)

PATHS = ("absorbed", "grouped")


class VerificationError(GqlaError, RuntimeError):
    """A rewritten layer did not reproduce the original on the check input."""


@dataclass
class LayerRewrite:
    """What optimize did to one attention module."""

    module_path: str
    layer_idx: int
    path: str
    dims: LatentDims
    records: list[PassRecord]
    verification_error: float
    cache_elements_before: int
    cache_elements_after: int
    traced_by: str = CAPTURE_METHOD
    trace_seconds: float = 0.0
    cache_elements_per_rank: int | None = None  # per token: what this tensor-parallel rank caches


@dataclass
class OptimizationState:
    """Everything optimize decided and did; kept on the model as ``model.gqla_optimization``."""

    path: str
    target: Any
    plan: Any
    layers: list[LayerRewrite]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    compile: Any = None
    seconds: float = 0.0
    tp: int = 1  # tensor-parallel ranks the attention is sharded over
    rank: int = 0  # this process's rank among them
    tp_sharding: dict[str, str] = field(default_factory=dict)  # what is sharded, what is replicated (tp > 1)


def optimize(
    model: nn.Module,
    target: Any = "auto",
    *,
    path: str = "auto",
    s_q: int = 1,
    batch_size: int = 1,
    context_len: int = 4096,
    tp: int | None = None,
    compile: bool = True,
    verify: bool = True,
    dump_dir: str | None = None,
) -> nn.Module:
    """Rewrite every latent-attention block of ``model`` into the path chosen for ``target``, in place.

    ``path="auto"`` asks the cost model (``gqla_compile.plan``) for the faster path at the given decode
    shape; "absorbed" or "grouped" forces one. ``compile=True`` runs the model through ``torch.compile``
    with Inductor; ``compile=False`` keeps the rewritten graphs eager (for debugging). A model without
    latent attention is returned unchanged with a warning (an error if a path was forced).

    ``tp=P`` (P > 1) shards the attention over the initialised ``torch.distributed`` default group of P
    ranks (passes/shard.py): each rank keeps its query heads (grouped path: its n_g / P groups and 1/P of
    the cache; absorbed path: the whole latent cache) and sums o_proj's partial outputs with an
    all-reduce. Embeddings, MLP and lm_head stay replicated (``model.gqla_optimization.tp_sharding``). A
    P that does not divide the groups (grouped) or heads (absorbed) is refused before any work.
    """
    if path not in ("auto", *PATHS):
        raise ValueError(f"path must be 'auto', 'absorbed' or 'grouped', got {path!r}")
    if isinstance(tp, int) and tp > 1:
        _check_shardable(model, path, tp)
    parallel = tensor_parallel_group(tp)
    if getattr(model, "gqla_optimization", None) is not None:
        raise GqlaError("this model is already optimized; optimize a fresh copy to change the target or path")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    captures = capture_attention_candidates(model)
    found = [(c, _detect(c)) for c in captures]
    matched = [(c, m, records) for c, (m, records) in found if m is not None]
    if not matched:
        message = (
            f"{type(model).__name__} holds no latent attention (checked {len(captures)} candidate blocks); "
            "nothing was rewritten. Convert a GQA model with gqla_compile.convert first"
        )
        if path != "auto":
            raise NoLatentAttentionError(message)
        warnings.warn(message, stacklevel=2)
        model.train(was_training)
        return model
    chosen, plan = _choose_path(
        model, matched, target, path, s_q=s_q, batch_size=batch_size, context_len=context_len,
        tp=parallel.size if parallel else 1,
    )
    modules = dict(model.named_modules())
    layers = []
    try:
        for ordinal, (capture, match, detect_records) in enumerate(matched):
            module = modules[capture.module_path]
            layers.append(
                _rewrite_layer(
                    module, capture, match, detect_records, chosen, plan.output_absorption, ordinal, verify, dump_dir,
                    parallel,
                )
            )
    except Exception:
        for capture, _, _ in matched:
            uninstall(modules[capture.module_path])
        raise
    skipped = [(c.module_path, "no latent attention in its graph") for c, (m, _) in found if m is None]
    model.gqla_optimization = OptimizationState(
        path=chosen, target=getattr(plan, "target", target), plan=plan, layers=layers, skipped=skipped
    )
    if parallel is not None:
        state = model.gqla_optimization
        state.tp, state.rank = parallel.size, parallel.rank
        state.tp_sharding = {"attention": f"sharded by {'groups' if chosen == 'grouped' else 'query heads'}",
                             **REPLICATED}
    if compile:
        from .compile import compile_model

        model.gqla_optimization.compile = compile_model(model)
    model.gqla_optimization.seconds = time.perf_counter() - start
    logger.info("rewrote %d attention blocks to the %s path in %.1f s", len(layers), chosen, model.gqla_optimization.seconds)
    model.train(was_training)
    return model


def _detect(capture: CapturedAttention) -> tuple[LatentAttentionMatch | None, list[PassRecord]]:
    detect = DetectLatentAttention(capture)
    manager = PassManager([detect])
    manager(capture.graph_module, capture.module_path)
    return detect.match, manager.records


def _check_shardable(model, path: str, tp: int) -> None:
    """Refuse a tp the model's attention cannot be split over, before any work (models with a latent
    config; others are checked by the plan, from the detected dims, before anything is rewritten)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    if config is None or not is_latent_config(config):
        return
    dims = LatentDims.from_config(config)
    problems = {p: shard_problem(p, dims, tp) for p in PATHS}
    if path != "auto" and problems[path]:
        raise ValueError(problems[path])
    if all(problems.values()):
        raise ValueError(problems["absorbed"])


def _choose_path(model, matched, target, path, **shape):
    """The forced path, or the cost model's choice for the target at this decode shape.

    The plan is made from the dims detection read off the graph (not the model's config, which a
    hand-written model may not have), in the dtype of the model's weights.
    """
    from .cost_model import plan as make_plan

    _, first, _ = matched[0]
    dtype = next(model.parameters()).dtype
    plan = make_plan(first.dims.as_config(len(matched)), target=target, path=path, dtype=dtype, **shape)
    return (path if path != "auto" else plan.path), plan


def _rewrite_layer(
    module, capture, match, detect_records, chosen, output_absorption, ordinal, verify, dump_dir,
    parallel: TensorParallel | None = None,
) -> LayerRewrite:
    parameters = {**{n: p.detach() for n, p in module.named_parameters()}, **dict(module.named_buffers())}
    up = probe_up_projections(capture, match, parameters)
    dims = replace(match.dims, n_g=up.num_groups)
    o_weight = parameters[match.weight_name(capture, match.output_projection)]
    o_bias_name = match.weight_name(capture, match.output_projection, 2)
    o_bias = parameters[o_bias_name] if o_bias_name else None
    split = SplitLatentProjection(capture, parameters)
    # Tensor parallel: this rank's heads, groups and o_proj columns; the tails below are built from them.
    shard, local, group = _shard(capture, chosen, dims, parallel)
    if shard is not None:
        up, o_weight = shard.shard_weights(up, o_weight)
    if chosen == "absorbed":
        if output_absorption == "folded":
            folded = fold_value_up_projection(o_weight, up.value, local.n_h, layer=capture.module_path)
            core = LatentAttentionCore(folded, o_bias, match.scaling, latent_value_dims=dims.d_c, process_group=group)
            value_side = {"o_proj_folded (W_O,h W_UV^g(h))": folded}
        else:
            core = LatentAttentionCore(o_weight, o_bias, match.scaling, latent_value_dims=dims.d_c, value_up=up.value,
                                       process_group=group)
            value_side = {"value_up (W_UV^g per group, after attention)": up.value}
        tail = AbsorbQuery(up.key, output_absorption, value_side)
    else:
        tail = ExpandNewTokens(stack_group_up_projections(up.key, up.value), n_g=local.n_g, d_n=dims.d_n)
        core = LatentAttentionCore(o_weight, o_bias, match.scaling, process_group=group)
    passes = [split, tail] if shard is None else [split, shard, tail]
    manager = PassManager(passes, dump_dir=dump_dir)
    projection = manager(capture.graph_module, capture.module_path)
    runtime = InstalledLatentAttention(
        projection,
        core,
        path=chosen,
        layer_idx=getattr(module, "layer_idx", ordinal),
        argument_names=capture.argument_names,
        user_inputs=capture.user_inputs,
        output_arity=capture.output_arity,
    )
    error = verify_rewrite(module, runtime, capture) if verify else float("nan")
    install(module, runtime)
    return LayerRewrite(
        module_path=capture.module_path,
        layer_idx=runtime.layer_idx,
        path=chosen,
        dims=dims,
        records=detect_records + manager.records,
        verification_error=error,
        cache_elements_before=latent_cache_elements(dims, "original"),
        cache_elements_after=latent_cache_elements(dims, chosen),
        trace_seconds=capture.seconds,
        cache_elements_per_rank=latent_cache_elements(local, chosen),
    )


def _shard(capture, chosen: str, dims: LatentDims, parallel: TensorParallel | None):
    """(shard pass or None, the dims this rank computes, the process group for the core's all-reduce)."""
    if parallel is None:
        return None, dims, None
    shard = ShardAttention(TensorParallelLayout(chosen, dims, parallel.size, parallel.rank), capture,
                           backend=parallel.backend)
    return shard, shard.layout.local_dims, parallel.group


def verify_rewrite(module: nn.Module, runtime: InstalledLatentAttention, capture: CapturedAttention) -> float:
    """Relative error of the rewritten block against the original on the recorded call (no cache)."""
    arguments = {k: v for k, v in capture.example_arguments.items() if k not in ("cache", "past_key_values")}
    hidden = next(v for v in arguments.values() if isinstance(v, torch.Tensor) and v.dim() == 3)
    seq = hidden.shape[1]
    # An explicit additive causal mask: eager attention implementations treat "no mask" as bidirectional.
    causal = torch.full((seq, seq), torch.finfo(hidden.dtype).min, dtype=hidden.dtype).triu(1)
    arguments["attention_mask"] = causal.expand(hidden.shape[0], 1, seq, seq)
    with torch.no_grad():
        expected = _first(module(**arguments))
        got = _first(runtime(**arguments))
    if expected.shape != got.shape:
        raise VerificationError(
            f"{capture.module_path}: rewritten output has shape {tuple(got.shape)}, original {tuple(expected.shape)}"
        )
    error = ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()
    tolerance = 1e-4 if expected.dtype in (torch.float32, torch.float64) else 3e-2
    if not error <= tolerance:
        raise VerificationError(
            f"{capture.module_path}: the rewritten attention differs from the original (relative error "
            f"{error:.2e} > {tolerance:.0e}); the model was left unchanged. Please report this model"
        )
    return error


def _first(output):
    return output[0] if isinstance(output, tuple) else output
