"""``optimize``: capture -> detect -> plan -> build the chosen path -> verify -> install -> compile.

Each arrow is one module: capture.py, passes/detect.py, cost_model.py, paths.py (with passes/split.py,
passes/shard.py and the path's tail in passes/absorb.py or passes/expand.py), verification.py
(``verify_rewrite``), runtime.py and compile.py. This file only wires them: every layer travels as an explicit
:class:`~gqla_compile.passes.context.LayerContext`, and one :class:`PassManager` keeps the records the report
is built from.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .cache_sizes import latent_cache_elements
from .capture import CACHE_ARGUMENTS, CAPTURE_METHOD, CaptureResult, CapturedAttention, capture_candidates
from .compile import compile_model
from .cost_model import indexer_dims, plan as make_plan
from .dims import LatentDims, is_latent_config
from .distributed import TensorParallel, tensor_parallel_group
from .errors import (
    GqlaError,
    NoLatentAttentionError,
    NoLatentAttentionWarning,
    PartialRewriteWarning,
    VerificationError,
)
from .passes.context import LayerContext
from .passes.detect import attention_left_unchanged, detect_blocks, gate_width
from .passes.manager import PassManager, PassRecord
from .passes.shard import REPLICATED, ShardAttention, TensorParallelLayout
from .passes.split import SplitLatentProjection, split_token_selection
from .passes.graph import tensor_meta, weight_matmuls
from .paths import CoreTrace, DecodePath, check_path_argument, check_shardable, feasible_paths
from .runtime import InstalledLatentAttention, StatefulChild, TokenSelection, install, uninstall
from .verification import verify_rewrite

logger = logging.getLogger(__name__)

__all__ = ["optimize", "verify_rewrite", "OptimizationState", "LayerRewrite", "VerificationError"]


@dataclass
class LayerRewrite:
    """What optimize did to one attention module (facts for the report, from the passes and the path)."""

    module_path: str
    layer_idx: int
    path: str
    dims: LatentDims  # the whole layer's dims, n_g as probed
    records: list[PassRecord]  # this layer's records in the optimization's pass manager
    verification_error: float
    cache_elements_before: int
    cache_elements_after: int
    traced_by: str = CAPTURE_METHOD
    trace_seconds: float = 0.0
    cache_elements_per_rank: int | None = None  # per token: what this tensor-parallel rank caches
    local_dims: LatentDims | None = None  # what this rank computes (the whole layer without tensor parallelism)
    output_absorption: str | None = None  # absorbed path: how W_UV is applied
    matmul_weights_before: list[dict] = field(default_factory=list)  # captured graph: {"op", "weight", "shape"}
    matmul_weights_after: list[dict] = field(default_factory=list)  # projection graph and core, "graph" added
    core: CoreTrace | None = None  # the attention core at one decode step (ops, code, weights)
    compute_forms: dict = field(default_factory=dict)  # forms.FormChoice.describe: the form each call takes


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
    records: list[PassRecord] = field(default_factory=list)  # every pass record, all layers (the report's source)
    candidates: int = 0  # candidate blocks found by structure


def optimize(
    model: nn.Module,
    target: Any = "auto",
    *,
    path: str = "auto",
    s_q: int = 1,
    batch_size: int = 1,
    context_len: int = 4096,
    tp: int | None = None,
    rope_key: str = "auto",
    compile: bool = True,
    verify: bool = True,
    dump_dir: str | None = None,
) -> nn.Module:
    """Rewrite every latent-attention block of ``model`` into the path chosen for ``target``, in place.

    ``path="auto"`` asks the cost model (``gqla_compile.plan``) for the faster path at the given decode
    shape; "absorbed" or "grouped" forces one. ``rope_key`` is the grouped cache's layout: "copied" (k_R in
    every group's key), "shared" (k_R kept once) or "auto" (the plan's faster one); the plan and the report
    say which was taken. ``compile=True`` runs the model through ``torch.compile``
    with Inductor; ``compile=False`` keeps the rewritten graphs eager (for debugging). A model without
    latent attention is returned unchanged with a warning (an error if a path was forced); the warning
    names why each candidate block did not match, or which could not be traced.

    ``tp=P`` (P > 1) shards the attention over the initialised ``torch.distributed`` default group of P
    ranks (passes/shard.py): each rank keeps its query heads (grouped path: its n_g / P groups and 1/P of
    the cache; absorbed path: the whole latent cache) and sums o_proj's partial outputs with an
    all-reduce. Embeddings, MLP and lm_head stay replicated (``model.gqla_optimization.tp_sharding``). A
    P that does not divide the groups (grouped) or heads (absorbed) is refused before any work.
    """
    check_path_argument(path)
    if isinstance(tp, int) and tp > 1:
        _check_shardable(model, path, tp)
    parallel = tensor_parallel_group(tp)
    if getattr(model, "gqla_optimization", None) is not None:
        raise GqlaError("this model is already optimized; optimize a fresh copy to change the target or path")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        state = _optimize(model, target, path, parallel, verify=verify, dump_dir=dump_dir,
                          shape=dict(s_q=s_q, batch_size=batch_size, context_len=context_len, rope_key=rope_key))
    finally:
        model.train(was_training)
    if state is None:
        return model
    model.gqla_optimization = state
    if compile:
        state.compile = compile_model(model)
    state.seconds = time.perf_counter() - start
    logger.info("rewrote %d attention blocks to the %s path in %.1f s", len(state.layers), state.path, state.seconds)
    return model


def _optimize(model, target, path, parallel, *, verify, dump_dir, shape) -> OptimizationState | None:
    """capture -> detect -> plan -> build -> verify -> install; None (with a warning) when nothing matched."""
    manager = PassManager(dump_dir=dump_dir)
    modules = dict(model.named_modules())
    captured = capture_candidates(model)
    contexts = detect_blocks(modules, captured.captures, manager)
    matched = [c for c in contexts if c.detection.match is not None]
    skipped = ([(f.module_path, f.reason) for f in captured.failures]
               + [(c.module_path, c.detection.reason) for c in contexts if c.detection.match is None])
    if not matched:
        message = _nothing_matched_message(model, captured, contexts)
        if path != "auto":
            raise NoLatentAttentionError(message)
        warnings.warn(message, NoLatentAttentionWarning, stacklevel=3)
        return None
    left = attention_left_unchanged(captured.failures, [c.detection for c in contexts])
    _warn_if_partial(left, matched)
    plan = _plan(model, matched, target, path, tp=parallel.size if parallel else 1, **shape)
    decode_path = plan.decode_path
    layers = []
    cores: dict[tuple, CoreTrace] = {}  # layers of one structure share their core's trace
    try:
        for ordinal, context in enumerate(matched):
            module = modules[context.module_path]
            layer_idx = _cache_layer_index(module, context, ordinal, complete=not left)
            runtime = _build(manager, module, context, decode_path, plan, parallel, layer_idx)
            error = verify_rewrite(module, runtime, context.capture) if verify else math.nan
            install(module, runtime)
            layer = _layer_rewrite(context, runtime, decode_path, plan, parallel, manager, error)
            key = context.capture.structure_key
            if key not in cores:
                cores[key] = decode_path.trace_core(runtime.core, layer.local_dims, rope_key=plan.rope_key)
            layer.core = cores[key]
            layer.matmul_weights_after += [{"graph": "core", **m} for m in layer.core.matmul_weights]
            layers.append(layer)
    except Exception:
        for context in matched:
            uninstall(modules[context.module_path])
        raise
    state = OptimizationState(path=decode_path.name, target=plan.target, plan=plan, layers=layers, skipped=skipped,
                              records=manager.records, candidates=captured.candidates)
    if parallel is not None:
        state.tp, state.rank = parallel.size, parallel.rank
        state.tp_sharding = {"attention": f"sharded by {decode_path.shard_count(layers[0].dims)[1]}", **REPLICATED}
    return state


def _nothing_matched_message(model: nn.Module, captured: CaptureResult, contexts: list[LayerContext]) -> str:
    """Why nothing was rewritten: the blocks that could not be traced, and each reason the others did not match."""
    name = type(model).__name__
    parts = []
    if captured.failures:
        failures = "; ".join(f"{f.module_path} ({f.module_type}): {f.error}" for f in captured.failures)
        parts.append(f"{len(captured.failures)} candidate block(s) could not be traced by torch.export, so "
                     f"whether they hold latent attention is unknown: {failures}")
    if contexts:
        reasons: dict[str, list[str]] = {}
        for context in contexts:
            reasons.setdefault(context.detection.reason, []).append(context.module_path)
        listed = "; ".join(f"{_paths_text(paths)}: {reason}" for reason, paths in reasons.items())
        unsupported = sum(c.detection.latent_but_unsupported for c in contexts)
        if unsupported:
            parts.append(f"{name} holds latent attention that cannot be rewritten yet in {unsupported} of the "
                         f"{len(contexts)} traced candidate block(s) ({listed})")
        else:
            parts.append(f"{name} holds no latent attention in the {len(contexts)} traced candidate block(s) ({listed})")
    elif not captured.failures and captured.without_attention:
        parts.append(f"{name} holds no latent attention: its {len(captured.without_attention)} candidate block(s) "
                     f"({_paths_text(captured.without_attention)}) compute no attention (no softmax or "
                     "scaled_dot_product_attention when run)")
    elif not captured.failures:
        parts.append(f"{name} holds no latent attention: no candidate block (a module with at least four linear "
                     "layers called with [batch, seq, hidden])")
    if captured.failures and not contexts:
        fix = "fix the tracing error above (or report it)"
    elif any(c.detection.latent_but_unsupported for c in contexts):
        fix = "the piece named above must be supported by the compiler (report it); converting will not help"
    else:
        fix = "convert a GQA model with gqla_compile.convert first"
    return "; ".join(parts) + f"; nothing was rewritten. To rewrite, {fix}"


def _paths_text(paths: list[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"


def _cache_layer_index(module: nn.Module, context: LayerContext, ordinal: int, *, complete: bool) -> int:
    """The cache layer a block reads and writes: its ``layer_idx`` (every transformers attention module has one);
    without it, its position among the rewritten blocks, which is right only when every block was rewritten."""
    layer_idx = getattr(module, "layer_idx", None)
    if isinstance(layer_idx, int):
        return layer_idx
    if not complete:
        raise GqlaError(
            f"{context.module_path} has no integer layer_idx attribute, and not every candidate block was rewritten, "
            "so which cache layer it uses is unknown; give the module a layer_idx (its index into the cache)"
        )
    return ordinal


def _warn_if_partial(left: list[tuple[str, str]], matched: list[LayerContext]) -> None:
    """Warn when some blocks were rewritten and others that hold attention (or could not be traced, ``left``:
    path and why) were not."""
    if left:
        listed = "; ".join(f"{path}: {reason}" for path, reason in left)
        warnings.warn(f"partial rewrite: {len(matched)} block(s) rewritten, {len(left)} block(s) with attention "
                      f"left unchanged ({listed})", PartialRewriteWarning, stacklevel=4)


def _check_shardable(model, path: str, tp: int) -> None:
    """Refuse a tp the model's attention cannot be split over, before any work (models with a latent
    config; others are checked by the plan, from the detected dims, before anything is rewritten)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    if config is None or not is_latent_config(config):
        return
    check_shardable(feasible_paths(LatentDims.from_config(config), tp), path)


def _plan(model: nn.Module, matched: list[LayerContext], target, path, **shape):
    """The cost model's plan (its path is the forced one when ``path`` is not "auto"); a sparse model's
    attention is priced at its largest top-k, plus its indexer where the config names the indexer's dims.

    It is made from the dims detection read off the graph and probing settled (n_g included), not from
    the model's config (which a hand-written model may not have), in the dtype of the model's weights.
    """
    dims = matched[0].match.dims
    dtype = next(model.parameters()).dtype
    top_ks = [c.match.selection.top_k for c in matched if c.match.selection is not None and c.match.selection.top_k]
    # a per-channel output gate multiplies each head's d_v values, which W_UV folded into o_proj has no more
    per_channel_gate = any(c.match.output_gate is not None and gate_width(c.match.output_gate, c.match.dims) != 1
                           for c in matched)
    return make_plan(dims.as_config(len(matched)), target=target, path=path, dtype=dtype,
                     top_k=max(top_ks) if top_ks else None, index_dims=indexer_dims(model) if top_ks else None,
                     output_absorption="bmm" if per_channel_gate else "auto",
                     **shape)


def _build(manager: PassManager, module: nn.Module, context: LayerContext, decode_path: DecodePath, plan,
           parallel: TensorParallel | None, layer_idx: int) -> InstalledLatentAttention:
    """The chosen path for one layer: split -> [shard] -> the path's tail, and its attention core."""
    capture, match = context.capture, context.match
    up = match.up_projections
    o_weight = context.parameters[match.weight_name(capture, match.output_projection)]
    o_bias_name = match.weight_name(capture, match.output_projection, 2)
    o_bias = context.parameters[o_bias_name] if o_bias_name else None
    passes: list = [SplitLatentProjection(context)]
    local, group = match.dims, None
    sink = context.parameters[capture.parameter_inputs[match.attention_sink.name]] if match.attention_sink else None
    if parallel is not None:
        # Tensor parallel: this rank's heads, groups, o_proj columns and sinks; the path is built from them.
        layout = TensorParallelLayout(decode_path, match.dims, parallel.size, parallel.rank, plan.rope_key)
        shard = ShardAttention(layout, capture, backend=parallel.backend, gates=int(match.output_gate is not None))
        up, o_weight = shard.shard_weights(up, o_weight)
        passes.append(shard)
        local, group = layout.local_dims, parallel.group
        sink = sink[slice(*layout.heads)] if sink is not None else None
    built = decode_path.build(up, o_weight, o_bias, match.scaling, local,
                              output_absorption=plan.output_absorption,
                              rope_key=plan.rope_key, attention_sink=sink, process_group=group,
                              module_path=capture.module_path)
    passes.append(built.tail)
    projection = manager.run(passes, capture.graph_module, capture.module_path)
    return InstalledLatentAttention(
        projection,
        built.core,
        path=decode_path.name,
        layer_idx=layer_idx,
        argument_names=capture.argument_names,
        user_inputs=capture.user_inputs,
        output_arity=capture.output_arity,
        gates=int(match.output_gate is not None),
        selection=_token_selection(module, context),
    )


def _token_selection(module: nn.Module, context: LayerContext) -> TokenSelection | None:
    """The block's token selection (sparse attention) as the runtime runs it, or None for dense attention."""
    capture, match = context.capture, context.match
    if match.selection is None:
        return None
    graph, argument_inputs = split_token_selection(capture, match, context.parameters)
    selection, child = match.selection, None
    if selection.stateful:
        _, name, arguments, *_ = selection.source.args
        indexer = module.get_submodule(name)
        cache_argument = next(a for a in CACHE_ARGUMENTS if a in inspect.signature(indexer.forward).parameters)
        child = StatefulChild(indexer, arguments.split(","), cache_argument)
    return TokenSelection(graph, indexed=selection.index_key is not None, argument_inputs=argument_inputs,
                          returned=list(selection.returned), top_k=selection.top_k,
                          mask_dtype=None if child else _traced_mask_dtype(capture),
                          replaces_mask=selection.replaces_mask, stateful_child=child,
                          distinct=selection.topk is not None)


def _traced_mask_dtype(capture: CapturedAttention) -> torch.dtype | None:
    """The dtype of the attention mask the block was traced with (None: traced without one)."""
    for placeholder, (name, _) in zip(capture.user_placeholders, capture.user_inputs):
        if name == "attention_mask":
            return tensor_meta(capture.placeholder(placeholder)).dtype
    return None


def _layer_rewrite(context: LayerContext, runtime: InstalledLatentAttention, decode_path: DecodePath, plan, parallel,
                   manager: PassManager, error: float) -> LayerRewrite:
    dims = context.match.dims
    tp = parallel.size if parallel else 1
    capture, projection = context.capture, runtime.projection
    parameter_shapes = {n.name: (capture.parameter_inputs[n.name], list(tensor_meta(n).shape))
                        for n in capture.graph_module.graph.nodes
                        if n.op == "placeholder" and n.name in capture.parameter_inputs}
    # split.py holds parameter p as buffer p.replace(".", "_"); the report names it p
    parameter_of = {name.replace(".", "_"): name for name in capture.parameter_inputs.values()}
    attributes = {n: (parameter_of.get(n.target, n.target), list(getattr(projection, n.target).shape))
                  for n in projection.graph.nodes if n.op == "get_attr"}
    local_dims = TensorParallelLayout(decode_path, dims, tp, parallel.rank).local_dims if parallel else dims
    forms = runtime.core.forms.describe(s_q=plan.s_q, context_len=plan.context_len)
    return LayerRewrite(
        module_path=context.module_path,
        layer_idx=runtime.layer_idx,
        path=decode_path.name,
        dims=dims,
        records=manager.records_of(context.module_path),
        verification_error=error,
        cache_elements_before=latent_cache_elements(dims, "original"),
        cache_elements_after=decode_path.cache_elements(dims, rope_key=plan.rope_key),
        trace_seconds=context.capture.seconds,
        cache_elements_per_rank=decode_path.rank_cache_elements(dims, tp, rope_key=plan.rope_key),
        local_dims=local_dims,
        compute_forms=forms,
        output_absorption=plan.output_absorption if decode_path.output_absorptions else None,
        matmul_weights_before=weight_matmuls(capture.graph_module, lambda n: parameter_shapes.get(n.name)),
        matmul_weights_after=[{"graph": "projection", **m} for m in weight_matmuls(projection, attributes.get)],
    )
