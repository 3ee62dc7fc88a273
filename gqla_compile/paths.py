"""The decoding paths a latent-attention layer can be rewritten into: one object per path owns all of it.

A :class:`DecodePath` says, for one path, everything the rest of the compiler needs to know about it:

- its **cache layout** and size per token and layer, whole and per tensor-parallel rank;
- its **sharding rule**: which count tensor-parallel ranks split (groups or query heads), and why a
  given ``tp`` cannot;
- its **cost terms** for the roofline cost model: the head dims the attention core reads per cached token
  and the weights its projections read per step;
- its **compute forms** (:class:`FormChoice`): how one call can compute its attention over that cache (the
  absorbed path: in latent space, or with the call's keys expanded into per-group keys and values), their FLOP
  terms, the per-call rule and the crossover between them;
- its **builder**: the graph tail appended to the latent projection (``passes/absorb.py`` or
  ``passes/expand.py``) and the attention core (``runtime.LatentAttentionCore``) configured for it, from the
  per-group up-projections detection probed; the plan's choices are the builder's parameters;
- its **description** for the report;
- the **choices** it offers the plan (``rope_keys``, ``output_absorptions``) and the attention-kernel class the
  cost model prices (``attention_kernel``);
- its **serving layout** (``serving_layout``): what a serving engine (vLLM) caches and which of its attention
  layers runs it.

``PATHS`` is the registry: the one place that lists the paths. To add a path, subclass ``DecodePath``,
implement its members and register an instance (``register_path``); the plan, the pipeline, the shard pass,
the cost model and the report pick it up from the registry and never name a path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from .cost_terms import Matmul, down_projection, linear, output_flops, per_group, query_matmuls
from .dims import OUTPUT_ABSORPTIONS, QUERY_ABSORPTION, ROPE_KEYS, LatentDims
from .forms import ComputeForm, FormChoice, form_text  # noqa: F401  form_text: re-exported for the report
from .passes.absorb import AbsorbQuery
from .passes.expand import ExpandNewTokens
from .passes.fold import fold_value_up_projection, stack_group_up_projections
from .passes.graph import op_histogram, weight_matmuls
from .passes.match import UpProjections
from .runtime import ExpandedForm, LatentAttentionCore


#: Cached tokens in the attention core's trace for the report: one decode step over this many.
CORE_TRACE_CONTEXT = 16


@dataclass(frozen=True)
class CoreTrace:
    """The attention core of one layer at one decode step, as the report shows it."""

    ops: dict[str, int]  # aten op histogram
    code: str  # the traced graph's code
    matmul_weights: list[dict[str, Any]]  # {"op", "weight", "shape"} per matmul on a weight


@dataclass(frozen=True)
class BuiltPath:
    """What a path's builder returns for one layer: the graph tail pass and the attention core."""

    tail: Any  # a graph pass appending the path's tail to the latent projection
    core: Any  # runtime.LatentAttentionCore


class DecodePath:
    """One decoding path of a latent-attention layer (see the module docstring)."""

    name: str
    #: Human-readable cache layout, for the report and the docs.
    cache_layout: str
    #: What tensor-parallel ranks split on this path, for messages and the report.
    shards_by: str
    #: The RoPE-key layouts (``dims.ROPE_KEYS``) this path's cache can take, which the plan chooses among; empty
    #: where the cache holds the RoPE key one way only (the ``rope_key`` arguments are then ignored).
    rope_keys: tuple[str, ...] = ()
    #: How this path can apply W_UV after attention (``dims.OUTPUT_ABSORPTIONS``), which the plan chooses among;
    #: empty where the values leave attention per head and o_proj takes them as they are.
    output_absorptions: tuple[str, ...] = ()

    # ---- cache
    def cache_elements(self, dims: LatentDims, *, rope_key: str = "copied") -> int:
        """Cached elements per token and layer (keys and values together)."""
        raise NotImplementedError

    def cache_shapes(self, dims: LatentDims, batch: int, tokens: int, *,
                     rope_key: str = "copied") -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(key shape, value shape) of one layer's cache after ``tokens`` tokens, as the runtime writes it."""
        raise NotImplementedError

    def rank_dims(self, dims: LatentDims, tp: int) -> LatentDims:
        """The dims one of ``tp`` ranks caches: its share of what this path splits."""
        raise NotImplementedError

    def rank_cache_elements(self, dims: LatentDims, tp: int, *, rope_key: str = "copied") -> int:
        return self.cache_elements(self.rank_dims(dims, tp), rope_key=rope_key)

    def cache_views(self, dims: LatentDims, key: torch.Tensor, value: torch.Tensor, *,
                    rope_key: str = "copied") -> tuple[list[torch.Tensor], torch.Tensor]:
        """(key parts, values) as this path's attention core reads a cache of ``cache_shapes`` (for measuring the
        core's kernel on its own layout, ``targets.measure_cpu``)."""
        raise NotImplementedError

    def query_head_dims(self, dims: LatentDims) -> int:
        """Width of each head's query as the decode attention (``attention.attention_over_cache``) reads the
        path's cache with it."""
        raise NotImplementedError

    def core_query_dims(self, dims: LatentDims) -> int:
        """Width of each head's query as the path's tail hands it to the attention core: [q_n ; q_R] on every
        path (the absorbed core moves q_n into latent space itself, only in the forms that read the latent)."""
        return dims.d_n + dims.d_R

    # ---- compute forms (per call; the cache layout is the path's)
    def compute_forms(self, dims: LatentDims, *, output_absorption: str = "bmm") -> FormChoice:
        """The forms one call over this path's cache can take, with their cost terms (``dims``: what this rank
        computes); the first is the decode step's."""
        raise NotImplementedError

    # ---- sharding
    def shard_count(self, dims: LatentDims) -> tuple[int, str]:
        """(how many units ranks split, what they are called)."""
        raise NotImplementedError

    def shard_problem(self, dims: LatentDims, tp: int) -> str | None:
        """Why ``tp`` ranks cannot shard a layer of ``dims`` on this path, or None when they can."""
        count, what = self.shard_count(dims)
        if count % tp:
            return (f"tp={tp} does not divide the {count} {what}: the {self.name} path gives each rank whole "
                    f"{what}; use a tp that divides {count}")
        return None

    # ---- cost terms (per layer, for the whole layer; the cost model divides sharded weights by tp)
    def attended_tokens(self, context_len: int, top_k: int | None = None) -> int:
        """Cached tokens one query reads: the whole context, or the k a token selection (sparse attention)
        keeps; both paths gather only the selected rows of their own layout."""
        return context_len if top_k is None else min(context_len, top_k)

    def attention_head_dims(self, dims: LatentDims) -> int:
        """Dims each query head's scores and weighted sum touch per cached token (FLOPs / 2 per head)."""
        raise NotImplementedError

    def projection_matmuls(self, dims: LatentDims, *, output_absorption: str = "bmm") -> list[Matmul]:
        """The weights this path's projections read per step and their FLOPs."""
        raise NotImplementedError

    def query_rows_per_cached_head(self, dims: LatentDims) -> int:
        """Query heads the attention core folds onto each cached head per new token: the rows of its matmuls
        over the cache, which set how efficient they run (``Target.efficiency``)."""
        raise NotImplementedError

    def attention_kernel(self, rope_key: str = "copied", *, multi_token: bool = False) -> str:
        """The kernel class of this path's attention core, whose efficiency a measured target knows
        (``Target.kernels``): one per RoPE-key layout the path offers besides the first (a layout's keys may be
        strided views), and several new tokens per sequence run another kernel than one (attention.KEYS_MAJOR_ROWS)."""
        layout = f"_{rope_key}" if self.rope_keys and rope_key != self.rope_keys[0] else ""
        name = f"attention_{self.name}{layout}"
        return f"{name}_multi_token" if multi_token else name

    def kernel_layouts(self) -> tuple[str, ...]:
        """The RoPE-key layouts whose attention core is a kernel class of its own (measure_cpu measures each)."""
        return self.rope_keys or ("copied",)

    def absorption_text(self, output_absorption: str) -> str | None:
        """How this path applies the up-projections around attention under the plan's ``output_absorption``,
        for the plan's explanation; None where it has no such choice."""
        return None

    # ---- build
    def build(
        self,
        up: UpProjections,
        o_weight: torch.Tensor,
        o_bias: torch.Tensor | None,
        scaling: float,
        dims: LatentDims,
        *,
        output_absorption: str = "bmm",
        rope_key: str = "copied",
        query_absorption: str = QUERY_ABSORPTION,
        attention_sink: torch.Tensor | None = None,
        process_group: Any = None,
        module_path: str = "",
    ) -> BuiltPath:
        """The tail pass and the attention core of one layer (``dims``: what this rank computes;
        ``attention_sink``: the block's learned sink logits [n_h], or None)."""
        raise NotImplementedError

    def trace_core(self, core: torch.nn.Module, dims: LatentDims, *, rope_key: str = "copied",
                   context: int = CORE_TRACE_CONTEXT) -> CoreTrace:
        """The attention core's aten graph at one decode step (one query token over ``context`` cached tokens)
        for a layer of ``dims`` (what this rank computes), with the weights it multiplies by, by name."""
        weights = {name: tensor for name, tensor in core.named_buffers() if tensor is not None}
        first = next(iter(weights.values()))
        like = dict(dtype=first.dtype, device=first.device)
        key_shape, value_shape = self.cache_shapes(dims, 1, context, rope_key=rope_key)
        query = torch.zeros(1, dims.n_h, 1, self.core_query_dims(dims), **like)
        key, value = torch.zeros(key_shape, **like), torch.zeros(value_shape, **like)

        def step(weights, query, key, value):
            return torch.func.functional_call(core, weights, (query, key, value, None))

        with torch.no_grad():
            gm = make_fx(step, pre_dispatch=True)(weights, query, key, value)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        named = {node: (f"core.{name}", list(tensor.shape))
                 for node, (name, tensor) in zip(placeholders, weights.items())}
        return CoreTrace(dict(op_histogram(gm)), gm.code, weight_matmuls(gm, named.get))

    def describe(self) -> dict[str, str]:
        """Plain-data description for the report."""
        return {"name": self.name, "cache_layout": self.cache_layout, "shards_by": self.shards_by}

    def __repr__(self) -> str:
        return f"<DecodePath {self.name}>"

    # ---- serving engines
    def serving_layout(self, dims: LatentDims) -> ServingLayout:
        """How a serving engine (vLLM) holds this path: what it caches and which attention layer runs it."""
        raise NotImplementedError


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class AbsorbedPath(DecodePath):
    """Absorbed MQA: the query moves into latent space; every head attends over the cached [c ; k_R]."""

    name = "absorbed"
    cache_layout = ("key [B, 1, T, d_c + d_R] = [c ; k_R] (one head, shared by all heads), value [B, 1, T, 0] "
                    "(zero-width: attention reads the latent part of the key)")
    shards_by = "query heads (the latent is replicated: every rank caches it whole)"
    output_absorptions = OUTPUT_ABSORPTIONS

    def cache_elements(self, dims: LatentDims, *, rope_key: str = "copied") -> int:
        return dims.d_c + dims.d_R

    def cache_shapes(self, dims, batch, tokens, *, rope_key="copied"):
        return (batch, 1, tokens, dims.d_c + dims.d_R), (batch, 1, tokens, 0)

    def cache_views(self, dims, key, value, *, rope_key="copied"):
        return LatentAttentionCore(torch.empty(0), None, 1.0, latent_value_dims=dims.d_c).cache_views(key, value)

    def rank_dims(self, dims: LatentDims, tp: int) -> LatentDims:
        return dims  # the latent is not split

    def query_head_dims(self, dims: LatentDims) -> int:
        return dims.d_c + dims.d_R  # the no-RoPE query moved into latent space

    def shard_count(self, dims: LatentDims) -> tuple[int, str]:
        return dims.n_h, "query heads"

    def attention_head_dims(self, dims: LatentDims) -> int:
        return 2 * dims.d_c + dims.d_R  # scores over d_c + d_R, weighted sum over the d_c latent values

    def query_rows_per_cached_head(self, dims: LatentDims) -> int:
        return dims.n_h  # every head reads the one latent

    def absorption_text(self, output_absorption: str) -> str:
        return f"{self.name} path applies W_UK as {QUERY_ABSORPTION}, W_UV as {output_absorption}"

    def projection_matmuls(self, dims: LatentDims, *, output_absorption: str = "bmm") -> list[Matmul]:
        _check_choice("output_absorption", output_absorption, OUTPUT_ABSORPTIONS)
        query = [*query_matmuls(dims), per_group("w_uk (bmm)", dims, dims.d_n)]
        if output_absorption == "folded":
            output = [linear("o_proj folded (W_O W_UV)", dims.hidden_size, dims.n_h * dims.d_c)]
        else:
            output = [per_group("w_uv (bmm)", dims, dims.d_v), linear("o_proj", dims.hidden_size, dims.n_h * dims.d_v)]
        return [*query, down_projection(dims), *output]

    def compute_forms(self, dims: LatentDims, *, output_absorption: str = "bmm") -> FormChoice:
        """Absorbed: the query moves into latent space and every head reads [c ; k_R] (decode). Expanded: the
        call's keys' latents (prefix and new tokens) become per-group keys and values, the heads attend over
        them in GQA form and o_proj takes their d_v values; the cache still receives only the latent."""
        _check_choice("output_absorption", output_absorption, OUTPUT_ABSORPTIONS)
        latent = dims.d_c + dims.d_R
        query_up = 2 * dims.n_h * dims.d_n * dims.d_c  # W_UK on each new token's query
        if output_absorption == "folded":
            output = output_flops(dims, dims.d_c)
        else:
            output = 2 * dims.n_h * dims.d_v * dims.d_c + output_flops(dims, dims.d_v)
        grouped = GroupedPath()
        absorbed = ComputeForm(
            "absorbed", "the query in latent space over the cached [c ; k_R] (MQA, head dim d_c + d_R)",
            per_pair=2 * dims.n_h * self.attention_head_dims(dims), per_query=query_up + output, per_key=0,
            elements_per_key=latent)
        expanded = ComputeForm(
            "expanded", "the keys' latents expanded into per-group keys and values (GQA over n_g groups), "
                        "the cache still receiving only the latent",
            per_pair=2 * dims.n_h * grouped.attention_head_dims(dims), per_query=output_flops(dims, dims.d_v),
            per_key=2 * dims.n_g * (dims.d_n + dims.d_v) * dims.d_c,
            elements_per_key=latent + 2 * dims.n_g * (dims.d_n + dims.d_R + dims.d_v), expands_cache=True)
        return FormChoice((absorbed, expanded))

    def build(self, up, o_weight, o_bias, scaling, dims, *, output_absorption="bmm", rope_key="copied",
              query_absorption=QUERY_ABSORPTION, attention_sink=None, process_group=None, module_path=""):
        _check_choice("output_absorption", output_absorption, OUTPUT_ABSORPTIONS)
        _check_choice("query_absorption", query_absorption, (QUERY_ABSORPTION,))
        expanded = ExpandedForm(stack_group_up_projections(up.key, up.value), o_weight, n_g=dims.n_g, d_n=dims.d_n)
        common = dict(latent_value_dims=dims.d_c, attention_sink=attention_sink, process_group=process_group,
                      query_up=up.key, forms=self.compute_forms(dims, output_absorption=output_absorption),
                      expanded=expanded)
        if output_absorption == "folded":
            folded = fold_value_up_projection(o_weight, up.value, dims.n_h, layer=module_path)
            core = LatentAttentionCore(folded, o_bias, scaling, **common)
            value_side = {"o_proj_folded (W_O,h W_UV^g(h))": folded}
        else:
            core = LatentAttentionCore(o_weight, o_bias, scaling, value_up=up.value, **common)
            value_side = {"value_up (W_UV^g per group, after attention)": up.value}
        value_side["w_ukv (W_UK^g ; W_UV^g stacked per group, expanded form)"] = expanded.key_value_up
        return BuiltPath(AbsorbQuery(up.key, output_absorption, value_side), core)

    def serving_layout(self, dims: LatentDims) -> ServingLayout:
        return ServingLayout(mla=True, kv_heads=1, head_size=dims.d_c + dims.d_R, up_projections=dims.n_h)


class GroupedPath(DecodePath):
    """Grouped GQA: only the new tokens' latents are expanded, into per-group keys and values."""

    name = "grouped"
    cache_layout = ("RoPE key copied: keys [B, n_g, T, d_n + d_R] (k_R in each group's key), values [B, n_g, T, d_v]; "
                    "shared: key [B, 1, T, n_g d_n + d_R] (the groups' no-RoPE keys, then k_R once), "
                    "value [B, 1, T, n_g d_v]")
    shards_by = "latent groups (each rank caches its groups' keys and values)"
    rope_keys = ROPE_KEYS

    def cache_elements(self, dims: LatentDims, *, rope_key: str = "copied") -> int:
        _check_choice("rope_key", rope_key, ROPE_KEYS)
        if rope_key == "copied":
            return dims.n_g * (dims.d_n + dims.d_R + dims.d_v)
        return dims.n_g * (dims.d_n + dims.d_v) + dims.d_R

    def cache_shapes(self, dims, batch, tokens, *, rope_key="copied"):
        _check_choice("rope_key", rope_key, ROPE_KEYS)
        if rope_key == "shared":
            return (batch, 1, tokens, dims.n_g * dims.d_n + dims.d_R), (batch, 1, tokens, dims.n_g * dims.d_v)
        return (batch, dims.n_g, tokens, dims.d_n + dims.d_R), (batch, dims.n_g, tokens, dims.d_v)

    def cache_views(self, dims, key, value, *, rope_key="copied"):
        return LatentAttentionCore(torch.empty(0), None, 1.0,
                                   shared_rope_key=self._shared_rope_key(dims, rope_key)).cache_views(key, value)

    @staticmethod
    def _shared_rope_key(dims: LatentDims, rope_key: str) -> tuple[int, int] | None:
        """The core's ``shared_rope_key`` for a layout: (groups, d_R) where k_R is kept once, else None."""
        _check_choice("rope_key", rope_key, ROPE_KEYS)
        return (dims.n_g, dims.d_R) if rope_key == "shared" else None

    def rank_dims(self, dims: LatentDims, tp: int) -> LatentDims:
        return replace(dims, n_h=dims.n_h // tp, n_g=dims.n_g // tp)

    def query_head_dims(self, dims: LatentDims) -> int:
        return dims.d_n + dims.d_R

    def shard_count(self, dims: LatentDims) -> tuple[int, str]:
        return dims.n_g, "latent groups"

    def attention_head_dims(self, dims: LatentDims) -> int:
        return dims.d_n + dims.d_R + dims.d_v

    def query_rows_per_cached_head(self, dims: LatentDims) -> int:
        return dims.n_h // dims.n_g  # the heads of a group read its keys and values

    def projection_matmuls(self, dims: LatentDims, *, output_absorption: str = "bmm") -> list[Matmul]:
        expand = linear("kv_b_proj (new tokens only)", dims.n_g * (dims.d_n + dims.d_v), dims.d_c)
        return [*query_matmuls(dims), down_projection(dims), expand,
                linear("o_proj", dims.hidden_size, dims.n_h * dims.d_v)]

    def compute_forms(self, dims: LatentDims, *, output_absorption: str = "bmm") -> FormChoice:
        """One form: the cache already holds per-group keys and values, so every call is GQA over them (the
        tail expands each new token's latent once, when it is cached)."""
        return FormChoice((ComputeForm(
            "grouped", "GQA over the cached per-group keys and values (n_g KV heads)",
            per_pair=2 * dims.n_h * self.attention_head_dims(dims),
            per_query=2 * dims.n_g * (dims.d_n + dims.d_v) * dims.d_c + output_flops(dims, dims.d_v), per_key=0,
            elements_per_key=self.cache_elements(dims)),))

    def build(self, up, o_weight, o_bias, scaling, dims, *, output_absorption="bmm", rope_key="copied",
              query_absorption=QUERY_ABSORPTION, attention_sink=None, process_group=None, module_path=""):
        shared = self._shared_rope_key(dims, rope_key)
        tail = ExpandNewTokens(stack_group_up_projections(up.key, up.value), n_g=dims.n_g, d_n=dims.d_n,
                               rope_key=rope_key)
        return BuiltPath(tail, LatentAttentionCore(o_weight, o_bias, scaling, shared_rope_key=shared,
                                                   attention_sink=attention_sink, process_group=process_group,
                                                   forms=self.compute_forms(dims)))

    def serving_layout(self, dims: LatentDims) -> ServingLayout:
        return ServingLayout(mla=False, kv_heads=dims.n_g, head_size=max(dims.d_n + dims.d_R, dims.d_v),
                             up_projections=dims.n_g)


#: The registry of decoding paths, by name. Order matters for cost ties: the first (smaller cache) wins.
PATHS: dict[str, DecodePath] = {path.name: path for path in (AbsorbedPath(), GroupedPath())}
#: The built-in paths' names (``register_path`` adds others to PATHS, never to these).
PATH_NAMES: tuple[str, ...] = tuple(PATHS)
#: Names a path cannot take: the plan's "auto" and the "original" cache of cache_sizes.kv_cache_elements.
RESERVED_NAMES = ("auto", "original")

#: What transformers' own MLA models cache, for "before" figures: the latent and the RoPE key per token.
ORIGINAL_CACHE_LAYOUT = ("latent c and RoPE key k_R per token (d_c + d_R), re-expanded to per-head keys and values "
                         "over the whole context at every step")


def register_path(path: DecodePath) -> DecodePath:
    """Add a path of the user's to the registry, after the others (cost ties go to those): the plan costs it,
    ``optimize(path=its name)`` builds, verifies and installs it, and the report describes it. A ValueError where
    its name is taken; ``unregister_path`` undoes it."""
    if not isinstance(path, DecodePath):
        raise TypeError(f"register_path takes a DecodePath instance, got {type(path).__name__}")
    name = getattr(path, "name", None)
    if not isinstance(name, str) or not name or name in PATHS or name in RESERVED_NAMES:
        taken = ", ".join(map(repr, [*PATHS, *RESERVED_NAMES]))
        raise ValueError(f"a path needs a name of its own (a non-empty string other than {taken}), got {name!r}")
    PATHS[name] = path
    return path


def unregister_path(name: str) -> DecodePath:
    """Remove a path ``register_path`` added (the built-in paths stay); returns it."""
    if name in PATH_NAMES:
        raise ValueError(f"{name!r} is a built-in path and stays registered")
    return PATHS.pop(get_path(name).name)


def get_path(name: str) -> DecodePath:
    """The registered path called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return PATHS[name]
    except KeyError:
        raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, got {name!r}") from None


def check_path_argument(path: str) -> None:
    """``path`` as optimize and plan accept it: "auto" or a registered path."""
    if path != "auto" and path not in PATHS:
        raise ValueError(f"path must be 'auto', {', '.join(map(repr, PATHS))}, got {path!r}")


def feasible_paths(dims: LatentDims, tp: int) -> dict[str, str | None]:
    """For each path, why ``tp`` ranks cannot shard it (None when they can)."""
    return {name: path.shard_problem(dims, tp) for name, path in PATHS.items()}


def check_shardable(problems: dict[str, str | None], path: str = "auto") -> None:
    """A ValueError naming why (``feasible_paths``' problems) where the forced ``path`` cannot be sharded, or
    where no path can."""
    if path != "auto" and problems[path]:
        raise ValueError(problems[path])
    if all(problems.values()):
        raise ValueError("; ".join(problems.values()))


@dataclass(frozen=True)
class ServingLayout:
    """A path as a serving engine holds it (``DecodePath.serving_layout``; gqla_compile.serving asks this)."""

    mla: bool  # the engine's MLA attention over one latent head [c ; k_R]; False: its GQA attention
    kv_heads: int  # cached heads per layer, whole model (a backend may pad their size, never their count)
    head_size: int  # cached head size the model needs (keys and values share one size on the GQA layout)
    up_projections: int  # blocks of kv_b_proj rows the engine's layer holds: one per query head (MLA) or group
