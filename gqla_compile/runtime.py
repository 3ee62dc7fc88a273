"""Install: the rewritten attention that replaces the original's forward, with transformers' own caches.

transformers' cache layers size themselves from the first update, keys and values separately, so no cache
class of our own is needed (generate, beam search, cropping and StaticCache come for free). Each path's
tail ends in (query, key, value) in the layout its ``DecodePath`` describes (paths.py): the runtime only
updates the cache and runs the core configured by the path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import (FOLD_QUERY_HEADS_UP_TO, attention_over_cache, branch_on, causal_attention,
                        is_prefill_into_empty_cache, selected_attention, without_repeats)
from .capture import CACHE_ARGUMENTS, argument_leaf
from .passes.expand import expand_new_tokens

#: The cache method transformers' DSA families keep their indexer's keys with (``DynamicIndexedLayer``).
UPDATE_INDEXER = "update_indexer"


def absorb_query(query: torch.Tensor, query_up: torch.Tensor) -> torch.Tensor:
    """query [B, n_h, T, d_n + d_R] and W_UK [n_g, d_n, d_c] -> the query in latent space [B, n_h, T, d_c + d_R]:
    each head's no-RoPE part times its group's W_UK (one batched matmul per group), the RoPE part kept."""
    n_g, d_n, _ = query_up.shape
    q_nope, q_rope = query[..., :d_n], query[..., d_n:]
    q_latent = torch.matmul(q_nope.unflatten(1, (n_g, -1)), query_up.unsqueeze(1)).flatten(1, 2)
    return torch.cat([q_latent, q_rope], dim=-1)


class ExpandedForm(nn.Module):
    """The expanded compute form over a latent cache (``paths.AbsorbedPath.compute_forms``): every key's latent
    [c ; k_R] -> per-group keys [B, n_g, S, d_n + d_R] and values [B, n_g, S, d_v] (the grouped path's tail on
    the whole call), so the heads attend in GQA form and o_proj, unfolded, takes their d_v values."""

    def __init__(self, key_value_up: torch.Tensor, o_weight: torch.Tensor, *, n_g: int, d_n: int):
        super().__init__()
        self.register_buffer("key_value_up", key_value_up, persistent=False)  # [n_g (d_n + d_v), d_c]
        self.register_buffer("o_weight", o_weight, persistent=False)  # the block's own o_proj (this rank's)
        self.n_g, self.d_n = n_g, d_n
        self.d_v = key_value_up.shape[0] // n_g - d_n

    def forward(self, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_c = self.key_value_up.shape[1]
        _, keys, values = expand_new_tokens(None, key[:, 0, :, :d_c], key[:, 0, :, d_c:], self.key_value_up,
                                            n_g=self.n_g, d_n=self.d_n, d_v=self.d_v)
        return keys, values


class LatentAttentionCore(nn.Module):
    """Attention over the cache, then the output projection: one module for both paths.

    How the core reads the cache (views only, nothing copied):

    - absorbed (``latent_value_dims`` = d_c): one key [B, 1, S, d_c + d_R]; the values are its first d_c
      dims. The output of attention lives in latent space and leaves it either through ``value_up`` (W_UV
      per group, one batched matmul, then the unchanged o_proj) or through an o_proj with W_UV folded in
      (W_O~, [D, n_h d_c]), whichever the plan found cheaper.
    - grouped, RoPE key copied: keys [B, n_g, S, d_n + d_R], values [B, n_g, S, d_v].
    - grouped, RoPE key shared (``shared_rope_key`` = (n_g, d_R)): key [B, 1, S, n_g d_n + d_R] holds the
      groups' no-RoPE keys then k_R once; value [B, 1, S, n_g d_v]. Scores are q_n . K_g + q_R . k_R.

    How one call computes (``forms``, a ``paths.FormChoice``: the path's compute forms and the rule that picks
    one from the call's new tokens T and keys S): the grouped path has one form. The absorbed path's core
    (``query_up`` = W_UK [n_g, d_n, d_c] given) receives the un-absorbed query [q_n ; q_R]: in the absorbed form
    it moves q_n into latent space itself; in the expanded form (``expanded``: :class:`ExpandedForm`) it
    expands the call's keys into per-group keys and values and attends over them with q_n as it is. Without
    ``query_up`` the query arrives in the cache's space (the core as the targets' calibration runs it).
    """

    def __init__(
        self,
        o_weight: torch.Tensor,
        o_bias: torch.Tensor | None,
        scale: float,
        *,
        latent_value_dims: int | None = None,
        value_up: torch.Tensor | None = None,
        shared_rope_key: tuple[int, int] | None = None,
        attention_sink: torch.Tensor | None = None,
        process_group=None,
        query_up: torch.Tensor | None = None,
        forms=None,
        expanded: ExpandedForm | None = None,
    ):
        super().__init__()
        self.register_buffer("o_weight", o_weight, persistent=False)
        self.register_buffer("query_up", query_up, persistent=False)  # W_UK [n_g, d_n, d_c]: absorbed path
        self.forms = forms  # paths.FormChoice, or None: one form, the cache's own
        self.expanded = expanded
        self.register_buffer("o_bias", o_bias, persistent=False)
        self.register_buffer("value_up", value_up, persistent=False)
        self.register_buffer("attention_sink", attention_sink, persistent=False)  # learned sinks [n_h] or None
        self.scale = scale
        self.latent_value_dims = latent_value_dims
        self.shared_rope_key = shared_rope_key
        # Tensor parallel (passes/shard.py): o_weight holds this rank's columns; partial outputs are summed.
        self.process_group = process_group

    def cache_views(self, key: torch.Tensor, value: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(key parts [B, h_i, S, d_i], values [B, h_v, S, d_v]) as views of one layer's cached tensors."""
        if self.latent_value_dims is not None:
            return [key], key[..., : self.latent_value_dims]
        if self.shared_rope_key is None:
            return [key], value
        n_g, d_r = self.shared_rope_key
        nope = key[:, 0, :, : key.shape[-1] - d_r].unflatten(-1, (n_g, -1)).transpose(1, 2)
        values = value[:, 0].unflatten(-1, (n_g, -1)).transpose(1, 2)
        return [nope, key[..., key.shape[-1] - d_r :]], values

    def forward(self, query, key, value, attention_mask, gate=None, indices=None):
        """``gate``: the block's optional output gate [B, T, n_h, 1 or d_v], multiplied on each head's value
        output (d_v, after W_UV on the absorbed path; a per-head gate may also meet W_UV folded into o_proj).
        ``indices``: the block's optional token selection [B, T, k] (sparse attention): each query reads only
        those cached rows.

        A prefill whose mask is plain causal over the first T rows (an empty StaticCache: its unwritten rows are
        masked) reads only those rows, causally (``is_prefill_into_empty_cache``): half the pairs, and the
        expanded form expands T latents, not the cache's length. Under torch.compile that is a ``torch.cond``
        on the mask, so one graph serves both."""
        t = query.shape[-2]
        if attention_mask is None or indices is not None or self.attention_sink is not None \
                or t <= FOLD_QUERY_HEADS_UP_TO:
            return self._reduced(self._partial(query, key, value, attention_mask, gate, indices))

        def written_rows_only(query, key, value, mask):
            rows = query.shape[-2]
            return self._partial(query, key[..., :rows, :], value[..., :rows, :], None, gate, None)

        def every_row(query, key, value, mask):
            return self._partial(query, key, value, mask, gate, None)

        fresh = is_prefill_into_empty_cache(attention_mask, t, value.shape[-2])
        return self._reduced(branch_on(fresh, written_rows_only, every_row, (query, key, value, attention_mask)))

    def _partial(self, query, key, value, attention_mask, gate, indices):
        """The block's output before the tensor-parallel sum, in the form the rule picks for the call."""
        form = self.forms.choose(query.shape[-2], key.shape[-2]) if self.forms is not None else None
        if form is not None and form.expands_cache:
            key, value = self.expanded(key)
            out = self._attend(query, key, value, attention_mask, indices, lambda k, v: ([k], v))
            return self._output(out, gate, None, self.expanded.o_weight)
        if self.query_up is not None:
            query = absorb_query(query, self.query_up)
        out = self._attend(query, key, value, attention_mask, indices, self.cache_views)
        return self._output(out, gate, self.value_up, self.o_weight)

    def _attend(self, query, key, value, attention_mask, indices, views):
        """Attention over ``key`` / ``value`` as ``views`` reads them: dense (causal), or each query over its
        selected rows."""
        if indices is None:
            return causal_attention(query, *views(key, value), attention_mask, self.scale, self.attention_sink)

        def attend_selected(query, key, value, mask):
            return attention_over_cache(query, *views(key, value), mask, self.scale, self.attention_sink)

        return selected_attention(
            query, key, value, attention_mask, indices, attend_selected,
            lambda mask: causal_attention(query, *views(key, value), mask, self.scale, self.attention_sink),
        )

    def _output(self, out, gate, value_up, o_weight):
        """Attention output [B, n_h, T, d] -> this rank's part of the block's output: W_UV per group (latent
        values), the gate, o_proj."""
        if value_up is not None:
            grouped = out.unflatten(1, (value_up.shape[0], -1))  # [B, n_g, heads per group, T, d_c]
            out = torch.matmul(grouped, value_up.transpose(1, 2).unsqueeze(1)).flatten(1, 2)
        if gate is not None:
            out = out * gate.transpose(1, 2)
        return F.linear(out.transpose(1, 2).flatten(2), o_weight)

    def _reduced(self, partial):
        """The ranks' parts summed (tensor parallel), then o_proj's bias once."""
        if self.process_group is None:
            return partial if self.o_bias is None else partial + self.o_bias
        return all_reduce_output(partial, self.o_bias, self.process_group)


def all_reduce_output(partial: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """Sum the ranks' partial o_proj outputs (a functional collective, so Inductor sees it), then add the
    bias once."""
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_reduce(partial, "sum", group)
    return funcol.wait_tensor(out) if bias is None else out + bias


def mask_as(mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """An attention mask in the form a graph was traced with: boolean (True: attend) or additive float (0:
    attend, the dtype's minimum: masked). The family's code branches on the form, and the traced graph kept
    one branch; transformers passes either, depending on the attention implementation and the step."""
    if dtype is None or mask.dtype == dtype:
        return mask
    if dtype == torch.bool:
        return mask > torch.finfo(mask.dtype).min / 2
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class StatefulChild:
    """A child module of the block that reads the cache (an indexer with state of its own), called by name
    with its tensor arguments and the cache. Held outside the module tree: its parameters stay the
    block's own, once in ``state_dict``."""

    def __init__(self, module: nn.Module, arguments: list[str], cache_argument: str):
        self.module, self.arguments, self.cache_argument = module, list(arguments), cache_argument

    def __call__(self, inputs: list[torch.Tensor], cache) -> torch.Tensor:
        return self.module(**dict(zip(self.arguments, inputs)), **{self.cache_argument: cache})


class TokenSelection(nn.Module):
    """The block's token selection at run time (passes/split.py cuts it out of the captured graph, unchanged).

    With an indexer, the new tokens' index keys go into the family's own indexer cache first
    (``cache.update_indexer``, what the family calls), and the graph scores every cached index key; a shared
    selection (another block's indices, a block input) is read as it is; an indexer that reads the cache
    itself (``stateful_child``) is called with the cache on the inputs the graph computes. Returns the
    indices as scattered into the mask [B, T, k] and the indices the block returns, by output position.
    ``replaces_mask``: the block's own mask reaches its attention only through the selection; ``distinct``:
    the indices come straight from a top-k, so a query's never repeat; any other selection's are made so for
    the attention (a repeat counts once), while the block returns them as they are.
    """

    def __init__(self, graph: fx.GraphModule, *, indexed: bool, argument_inputs: list[tuple[str, int | None]],
                 returned: list[int], top_k: int | None, mask_dtype: torch.dtype | None = None,
                 replaces_mask: bool = False, stateful_child: StatefulChild | None = None,
                 distinct: bool = True):
        super().__init__()
        self.graph = graph
        self.mask_dtype = mask_dtype  # the attention mask's dtype in the traced graph (bool or additive float)
        self.indexed = indexed
        self.argument_inputs = list(argument_inputs)
        self.returned = list(returned)
        self.top_k = top_k
        self.replaces_mask = replaces_mask
        self.stateful_child = stateful_child
        self.distinct = distinct  # a query's indices never repeat (they are a top-k's)

    def forward(self, projected: list[torch.Tensor], arguments: dict, cache, layer_idx: int):
        projected = list(projected)
        if self.indexed and cache is not None:
            projected[0] = getattr(cache, UPDATE_INDEXER)(projected[0], layer_idx)
        inputs = [argument_leaf(arguments, name, leaf) for name, leaf in self.argument_inputs]
        inputs = [mask_as(value, self.mask_dtype) if name == "attention_mask" else value
                  for (name, _), value in zip(self.argument_inputs, inputs)]
        outputs = self.graph(*projected, *inputs)
        if self.stateful_child is not None:
            indices = self.stateful_child(list(outputs), cache)
            returned = {position: indices for position in self.returned}
        else:
            indices, *others = outputs
            returned = dict(zip(self.returned, others))
        return (indices if self.distinct else without_repeats(indices)), returned


class InstalledLatentAttention(nn.Module):
    """Replaces an attention module's forward: projection graph -> cache update -> attention core.

    It is registered on the original module as ``gqla_runtime`` with only non-persistent buffers (shared
    with the original parameters where unchanged), so ``state_dict`` and ``save_pretrained`` see exactly
    the user's untouched weights.
    """

    def __init__(
        self,
        projection: fx.GraphModule,
        core: LatentAttentionCore,
        *,
        path: str,
        layer_idx: int,
        argument_names: list[str],
        user_inputs: list[tuple[str, int | None]],
        output_arity: int,
        gates: int = 0,
        selection: TokenSelection | None = None,
    ):
        super().__init__()
        self.projection = projection
        self.core = core
        self.path = path
        self.layer_idx = layer_idx
        self.argument_names = list(argument_names)
        self.user_inputs = list(user_inputs)
        self.output_arity = output_arity
        self.gates = gates
        self.selection = selection

    def forward(self, *args, **kwargs):
        arguments = dict(zip(self.argument_names, args))
        arguments.update(kwargs)
        inputs = [_as_traced(name, argument_leaf(arguments, name, leaf)) for name, leaf in self.user_inputs]
        # every path's tail ends in (query, key, value), then the block's optional pieces: an output gate, the
        # token selection's inputs
        query, key, value, *optional = self.projection(*inputs)
        gate, projected = optional[: self.gates], optional[self.gates :]
        cache = next((arguments[n] for n in CACHE_ARGUMENTS if arguments.get(n) is not None), None)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        indices, returned, mask = None, {}, arguments.get("attention_mask")
        if self.selection is not None:
            indices, returned = self.selection(projected, arguments, cache, self.layer_idx)
            if self.selection.replaces_mask:  # the selection is the whole mask: every cached key, then selected
                mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=query.device)
        out = self.core(query, key, value, mask, *gate, indices=indices)
        if self.output_arity == 0:
            return out
        return (out,) + tuple(returned.get(i) for i in range(1, self.output_arity))


def _as_traced(name: str, value):
    """A projection input in the form it was traced with: the block was captured without a cache, so its
    attention mask was square (new tokens x new tokens); a mask over the cached keys is cut to that shape
    (the projection never reads the mask's values: detection refuses blocks whose mask is computed)."""
    if name == "attention_mask" and isinstance(value, torch.Tensor) and value.shape[-1] != value.shape[-2]:
        return value[..., -value.shape[-2]:]
    return value


def install(module: nn.Module, runtime: InstalledLatentAttention) -> None:
    """Route the module's calls to the runtime; the module keeps its parameters untouched."""
    module.gqla_runtime = runtime
    module.forward = runtime.forward


def uninstall(module: nn.Module) -> None:
    """Undo :func:`install` (used when verification fails, so the model is left as it was)."""
    if "forward" in module.__dict__:
        del module.forward
    if hasattr(module, "gqla_runtime"):
        del module.gqla_runtime
