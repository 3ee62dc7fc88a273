"""``optimize`` on every MLA family of the installed transformers, as they ship (issue 11): the support table.

The families come from ``_families.FAMILIES`` (discovered at test time, built tiny from their own config
classes, random norm gains and biases, float32). For each family and each path: prefill plus DECODE_STEPS
cached greedy decode steps, logits within 1e-4 relative of the unmodified model at every step, the same
greedy tokens (on a prompt whose greedy continuation is not one repeated token), every latent block's
forward the installed runtime, and the cache in the path's layout. A family that cannot be rewritten is
a named ``xfail(strict=True)`` with its cause; README.md's family table is the same list.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from _families import (FAMILIES, TEXT_VOCAB, UNSUPPORTED, randomize_norms_and_biases, shared_tiny_model,
                       tiny_config)
from _models import HandWrittenLatentBlock, HandWrittenLatentLM, relative_error
from torch import nn

import gqla_compile
from gqla_compile.paths import PATHS

PROMPT, DECODE_STEPS = 12, 6  # DSA families: contexts of 12 to 18 tokens over an index top-k of 4


def _params():
    return [pytest.param(name, path, marks=pytest.mark.xfail(strict=True, reason=UNSUPPORTED[name]))
            if name in UNSUPPORTED else (name, path) for name in FAMILIES for path in PATHS]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """The family's tiny model with its matrices redrawn at std 0.5 (seeded): at the default init, tiny random
    models of several families (axk1, minicpm3, youtu) predict one token whatever the context, and a greedy
    comparison on such a model could not fail. Not the regrouping tests' shared model for that reason."""
    return _redrawn(copy.deepcopy(shared_tiny_model(name)))


def _redrawn(model):
    """``model`` with every matrix redrawn at std 0.5 (seeded), in place."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def _greedy(model, prompt: torch.Tensor):
    """Prefill, then DECODE_STEPS cached greedy steps: (generated tokens, logits of every step, cache)."""
    tokens, steps = [], []
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(DECODE_STEPS + 1):
            steps.append(out.logits[:, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) > DECODE_STEPS:
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens, steps, out.cache


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    """The unmodified model's greedy run on the first prompt (seeds 0, 1, ...) whose output is not one token."""
    for seed in range(20):
        prompt = torch.randint(0, TEXT_VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
        tokens, steps, _ = _greedy(_model(name), prompt)
        if len(set(tokens)) > 1:
            return prompt, tokens, steps
    raise AssertionError(f"{name}: every prompt's greedy continuation is one repeated token")


def _latent_blocks(model) -> list[str]:
    """The family's latent-attention modules, named independently of the compiler (the family's own
    ``kv_a_proj_with_mqa``)."""
    return sorted(name for name, module in model.named_modules() if hasattr(module, "kv_a_proj_with_mqa"))


@pytest.mark.parametrize("name, path", _params())
def test_family_decodes_like_the_unmodified_model(name, path):
    prompt, expected_tokens, expected_steps = _reference(name)
    model = gqla_compile.optimize(copy.deepcopy(_model(name)), path=path, target="h20", compile=False)
    state = model.gqla_optimization
    modules = dict(model.named_modules())
    assert sorted(layer.module_path for layer in state.layers) == _latent_blocks(model)
    for layer in state.layers:  # installed for real, on the chosen path
        runtime = modules[layer.module_path].gqla_runtime
        assert modules[layer.module_path].forward == runtime.forward and runtime.path == path
    top_k = _index_top_k(model)
    if top_k is not None:  # a sparse family: the selection is carried onto the path, with the family's k
        selections = [modules[layer.module_path].gqla_runtime.selection for layer in state.layers]
        assert top_k in {s.top_k for s in selections if s is not None}
        assert state.plan.top_k == top_k  # priced by k, and the report says so from the pass facts
        report = gqla_compile.report(model)
        assert f"sparse (indexer top-{top_k})" in report.to_text() and report.data["plan"]["top_k"] == top_k
    tokens, steps, cache = _greedy(model, prompt)
    assert tokens == expected_tokens
    for step, (got, want) in enumerate(zip(steps, expected_steps)):
        assert relative_error(got, want) < 1e-4, (name, path, step)
    length = PROMPT + DECODE_STEPS
    for layer in state.layers:  # the cache in the path's layout
        cached = cache.layers[layer.layer_idx]
        key_shape, value_shape = PATHS[path].cache_shapes(layer.dims, 1, length, rope_key=state.plan.rope_key)
        assert (tuple(cached.keys.shape), tuple(cached.values.shape)) == (key_shape, value_shape), layer.module_path


def _index_top_k(model) -> int | None:
    """The most tokens the family's DSA indexer selects per query, from its config (None: a dense family),
    independently of the compiler: the index top-k, plus the incomplete last pool's tokens for an indexer
    that pools its keys and always keeps that tail (glm5_next)."""
    config = model.config.get_text_config()
    top_k = getattr(config, "index_topk", None)
    if top_k is not None and getattr(config, "index_kpool_always_select_tail", False):
        top_k += config.index_kpool - 1
    return top_k


SPARSE_FAMILIES = [name for name in FAMILIES if name not in UNSUPPORTED and _index_top_k(shared_tiny_model(name))]


@pytest.mark.parametrize("name", SPARSE_FAMILIES)
def test_the_index_selection_matters_in_the_tiny_sparse_families(name):
    """With its top-k (4) the unmodified model's logits differ from the same model attending densely (every
    index top-k raised past the context), so the decode comparison above exercises the selection."""
    prompt, _, _ = _reference(name)
    dense = copy.deepcopy(_model(name))
    for module in dense.modules():
        if isinstance(getattr(module, "index_topk", None), int):
            module.index_topk = 10_000
    with torch.no_grad():
        sparse_logits = _model(name)(input_ids=prompt).logits
        dense_logits = dense(input_ids=prompt).logits
    assert relative_error(sparse_logits, dense_logits) > 1e-2


@pytest.mark.parametrize("name, path", [(name, path) for name in SPARSE_FAMILIES for path in PATHS])
def test_a_left_padded_batch_generates_like_the_unmodified_model(name, path):
    """Two prompts, the second left-padded: the padding mask reaches the selection (the family's indexer masks
    padded keys; glm5_next's indexer reads only that mask), the tokens and the unpadded logits stay the same."""
    model = _model(name)
    ids = torch.randint(0, TEXT_VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    optimized = gqla_compile.optimize(copy.deepcopy(model), path=path, target="h20", compile=False)
    with torch.no_grad():
        expected, got = (m(input_ids=ids, attention_mask=mask).logits for m in (model, optimized))
        want = model.generate(ids, attention_mask=mask, max_new_tokens=DECODE_STEPS, do_sample=False)
        have = optimized.generate(ids, attention_mask=mask, max_new_tokens=DECODE_STEPS, do_sample=False)
    assert relative_error(got[0], expected[0]) < 1e-4 and relative_error(got[1, 4:], expected[1, 4:]) < 1e-4
    assert len(set(want[:, PROMPT:].flatten().tolist())) > 1 and torch.equal(have, want)


# --- what optimize says about the blocks it cannot rewrite ----------------------------------------------------------


class LearnedKeyBiasBlock(HandWrittenLatentBlock):
    """A latent block whose attention mask is computed by a projection of its own (a learned per-key bias),
    not a top-k selection: a token selection no path carries yet."""

    def __init__(self, **sizes):
        super().__init__(**sizes)
        self.key_bias = nn.Linear(self.wq.in_features, 1)

    def forward(self, hidden_states, positions, attention_mask=None, cache=None):
        bias = F.logsigmoid(self.key_bias(hidden_states)).transpose(1, 2).unsqueeze(1)  # [B, 1, 1, T]
        mask = bias if attention_mask is None else attention_mask + bias
        return super().forward(hidden_states, positions, attention_mask=mask, cache=cache)


def test_an_unrecognised_token_selection_is_named_as_latent_attention_that_cannot_be_rewritten_yet():
    """A mask computed by the block's own projection in a form other than top-k indices: the error names the
    selection, not "no latent attention"."""
    torch.manual_seed(0)
    model = HandWrittenLatentLM(layers=1)
    model.blocks[0] = LearnedKeyBiasBlock(hidden=48, heads=6, groups=3, latent=20, rope=8, nope=12, value=10)
    with pytest.raises(gqla_compile.NoLatentAttentionError) as caught:
        gqla_compile.optimize(model, path="absorbed", target="h20", compile=False)
    message = str(caught.value)
    assert "holds latent attention that cannot be rewritten yet" in message
    assert "learned token selection" in message and "converting will not help" in message
    assert "could not be traced" not in message and "convert a GQA model" not in message


def _glm5_next_with_a_shared_indexer_layer():
    """glm5_next with two latent layers, the second reusing the first's selection (``indexer_types`` "shared"):
    the indices it reads are a block input holding -1 for "no token" (the pooled indexer pads with them)."""
    config = tiny_config(FAMILIES["glm5_next"])
    text = config.get_text_config()
    text.layer_types = ["linear_attention", "indexed_attention", "indexed_attention"]
    text.indexer_types = ["full", "full", "shared"]
    text.mlp_layer_types = ["dense", "sparse", "sparse"]
    text.num_hidden_layers = 3
    torch.manual_seed(0)
    return _redrawn(randomize_norms_and_biases(FAMILIES["glm5_next"].model_class(config).float().eval()))


@pytest.mark.parametrize("path", PATHS)
def test_a_stateful_indexer_and_a_layer_sharing_its_selection_decode_like_the_unmodified_model(path):
    """glm5_next's indexer reads the cache itself (its pooled keys and the cache length): it is kept as the
    family's own module, called with the real cache; the shared layer reads its -1 padded indices."""
    model = _glm5_next_with_a_shared_indexer_layer()
    prompt = torch.randint(0, TEXT_VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    expected_tokens, expected_steps, _ = _greedy(model, prompt)
    assert len(set(expected_tokens)) > 1
    optimized = gqla_compile.optimize(copy.deepcopy(model), path=path, target="h20", compile=False)
    modules = dict(optimized.named_modules())
    selections = [modules[layer.module_path].gqla_runtime.selection for layer in optimized.gqla_optimization.layers]
    assert len(selections) == 2 and selections[0].stateful_child is not None
    assert selections[1].stateful_child is None and selections[1].replaces_mask  # the shared layer's block input
    assert not selections[0].distinct and not selections[1].distinct  # not a top-k's: a repeat would count once
    tokens, steps, _ = _greedy(optimized, prompt)
    assert tokens == expected_tokens
    assert all(relative_error(got, want) < 1e-4 for got, want in zip(steps, expected_steps))
    assert not any("indexer" in name for name in modules[optimized.gqla_optimization.layers[0].module_path]
                   .gqla_runtime.state_dict())  # the indexer's weights stay the block's own, once


def test_a_shared_kv_container_argument_traces():
    """Mistral Large 4 passes a ``KVSharingDict`` between its blocks: captured as a plain dict, not refused."""
    from gqla_compile.capture import capture_candidates

    result = capture_candidates(copy.deepcopy(_model("mistral_large4")))
    assert result.captures and not result.failures
