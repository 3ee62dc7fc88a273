"""Regrouping MLA checkpoints in their own family (issue 12), on every MLA family of the installed transformers.

The families come from ``_families.FAMILIES`` (discovered at test time, built tiny from their own config
classes, MoE with few experts, hybrids with one linear-attention layer, random norm gains and biases).
``convert(model, num_groups=G)`` must return the same class, same config (plus the ``gqla_conversion``
record), every weight outside the attention blocks bit-identical; exact at G = n_h; at G = n_h / 2 both of
the compiler's paths must reproduce the converted model and the grouped cache must shrink by G / n_h.
Families the detector or the regrouping does not reach yet (``_families.UNSUPPORTED_REGROUP``) are
``xfail(strict=True)`` with the cause.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch
from _families import (FAMILIES, PER_CHANNEL_GATE, TEXT_VOCAB, UNSUPPORTED_REGROUP as UNSUPPORTED,
                       logits_in_stock_transformers, shared_tiny_model)
from _models import relative_error

import gqla_compile
from gqla_compile.conversion.calibration import random_token_sequences
from gqla_compile.conversion.mla import RECORD_FIELD, find_latent_blocks
from gqla_compile.cache_sizes import kv_cache_elements
from gqla_compile.errors import ConversionError

# One worker runs this whole file (pyproject's --dist loadgroup), so that the detections and conversions cached
# above (_gated, _converted, the trace cache) are made once: the gate test alone detects every family.
pytestmark = pytest.mark.xdist_group("regroup_families")

SUPPORTED = sorted(set(FAMILIES) - set(UNSUPPORTED))
CALIBRATION = random_token_sequences(TEXT_VOCAB, num_samples=4, seq_len=24, seed=1)
PROMPT, DECODE = 8, 4


def _family_params():
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=UNSUPPORTED[name]))
            if name in UNSUPPORTED else name for name in FAMILIES]


def _source(name: str):
    return shared_tiny_model(name)


@functools.lru_cache(maxsize=None)
def _converted(name: str, num_groups: int, grouping: str = "neighbour"):
    return gqla_compile.convert(_source(name), num_groups=num_groups, calibration=CALIBRATION, grouping=grouping,
                                progress=False)


@functools.lru_cache(maxsize=None)
def _gated(name: str) -> bool:
    """Whether the family's latent blocks carry a per-head output gate (similarity grouping refuses them)."""
    blocks, _ = find_latent_blocks(_source(name))
    return any(block.has_output_gate for block in blocks)


def _heads(name: str) -> int:
    return _source(name).config.get_text_config().num_attention_heads


def _tokens(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, TEXT_VOCAB, (2, PROMPT + DECODE), generator=torch.Generator().manual_seed(seed))


def _prefill_and_decode(model, tokens):
    """Logits of a prefill of PROMPT tokens and of each cached decode step after it; and the cache."""
    with torch.no_grad():
        out = model(input_ids=tokens[:, :PROMPT], use_cache=True)
        steps, cache = [out.logits], out.cache
        for i in range(PROMPT, tokens.shape[1]):
            out = model(input_ids=tokens[:, i : i + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    return steps, cache


def _attention_names(model) -> set[str]:
    """State-dict names of the weights regrouping may change (query, up- and output projection of each block)."""
    blocks, _ = find_latent_blocks(model)
    return {f"{b.path}.{leaf}.{kind}" for b in blocks for leaf in ("q_proj", "q_b_proj", "kv_b_proj", "o_proj")
            for kind in ("weight", "bias")}


def _assert_same_outside_attention(source, converted) -> set[str]:
    """Every weight and buffer outside the attention projections bit-identical; returns the changed names."""
    before, after = source.state_dict(), converted.state_dict()
    assert before.keys() == after.keys()
    attention = _attention_names(source)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= attention, sorted(changed - attention)[:5]
    return changed


# --- G = n_h: exact, same class, same everything outside attention ------------------------------------------------


@pytest.mark.parametrize("name", _family_params())
def test_as_many_groups_as_heads_reproduces_the_family(name):
    source = _source(name)
    converted = _converted(name, _heads(name))
    assert type(converted) is type(source) and converted is not source
    tokens = _tokens()
    for got, want in zip(_prefill_and_decode(converted, tokens)[0], _prefill_and_decode(source, tokens)[0]):
        assert relative_error(got, want) < 1e-5
    changed = _assert_same_outside_attention(source, converted)
    assert any(n.endswith("kv_b_proj.weight") for n in changed)  # the rewrite ran (each head in its own basis)
    record = getattr(converted.config, RECORD_FIELD)
    assert record["num_groups"] == _heads(name) and record["output"] == "family"
    config = converted.config.to_dict()
    assert config.pop(RECORD_FIELD)["source_architecture"] == type(source).__name__
    assert config == source.config.to_dict()


# --- G = n_h / 2: the compiler finds G groups; both paths equal the converted model ---------------------------------


def _grouped_cache_per_token(cache, num_tokens: int) -> tuple[int, set[int]]:
    """Elements per token summed over the cache's attention layers, and the head counts they hold."""
    elements, heads = 0, set()
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.numel():
            elements += (keys.numel() + layer.values.numel()) // num_tokens
            heads.add(keys.shape[1])
    return elements, heads


@pytest.mark.parametrize("name", _family_params())
def test_half_the_groups_both_paths_reproduce_the_converted_model(name):
    groups = _heads(name) // 2
    converted = _converted(name, groups, "neighbour" if _gated(name) else "similarity")
    blocks, _ = find_latent_blocks(converted)  # the detector's probing, on the regrouped weights
    assert blocks and {b.dims.n_g for b in blocks} == {groups}
    tokens = _tokens(seed=4)
    reference, _ = _prefill_and_decode(converted, tokens)
    for path in ("absorbed", "grouped"):
        # the copied RoPE-key layout: n_g heads of d_n + d_R keys, so the cache scales exactly with the groups
        model = gqla_compile.optimize(copy.deepcopy(converted), path=path, target="h20", compile=False,
                                      rope_key="copied")
        assert len(model.gqla_optimization.layers) == len(blocks)
        steps, cache = _prefill_and_decode(model, tokens)
        for got, want in zip(steps, reference):
            assert relative_error(got, want) < 1e-4, path
        if path == "grouped":
            per_token, heads = _grouped_cache_per_token(cache, tokens.numel())
            source_per_block = kv_cache_elements(_source(name).config, "grouped")  # n_h heads per block
            assert heads == {groups}
            assert per_token * _heads(name) == len(blocks) * source_per_block * groups


def test_similarity_grouping_moves_a_per_head_gate_with_its_heads():
    """Each gated family (bailing_hybrid, dots3_note) with its heads paired out of neighbour order: in every latent
    block head h + n_h / 2 gets head h's up-projection. Similarity grouping pairs them, so regrouping to n_h / 2
    groups is exact, and the converted model equals the source only if the per-head gate's projection rows moved
    with their heads."""
    gated = [name for name in SUPPORTED if _gated(name)]
    assert gated, "no discovered family has a gated latent block"
    tokens = _tokens(seed=4)
    for name in gated:
        source, heads = copy.deepcopy(_source(name)), _heads(name)
        with torch.no_grad():
            for block in (m for m in source.modules() if hasattr(m, "kv_b_proj")):
                rows = block.kv_b_proj.weight.view(heads, -1, block.kv_b_proj.weight.shape[-1])
                rows[heads // 2:] = rows[: heads // 2]
        converted = gqla_compile.convert(source, num_groups=heads // 2, calibration=CALIBRATION,
                                         grouping="similarity", progress=False)
        groups = [sorted(g) for g in converted.config.to_dict()[RECORD_FIELD]["layers"][0]["groups"]]
        assert groups == [[h, h + heads // 2] for h in range(heads // 2)], (name, groups)
        with torch.no_grad():
            expected = source(input_ids=tokens, use_cache=False).logits
            got = converted(input_ids=tokens, use_cache=False).logits
        assert relative_error(got, expected) < 1e-5, name


def test_regrouping_refuses_a_per_channel_output_gate():
    """A gate per value channel (hy_v4, axk2) sits between the values' new basis and o_proj, which undoes it:
    the regrouped model would compute something else, so convert refuses before any work, naming the block."""
    per_channel = [name for name, reason in UNSUPPORTED.items() if reason == PER_CHANNEL_GATE]
    assert per_channel, "no discovered family is listed with a per-channel output gate"
    for name in per_channel:
        assert any(block.output_gate_width > 1 for block in find_latent_blocks(_source(name))[0]), name
        with pytest.raises(ConversionError, match=r"self_attn: its output gate multiplies each of the \d+ value"):
            gqla_compile.convert(_source(name), num_groups=_heads(name), calibration=CALIBRATION, progress=False)


# --- what makes each named family special ---------------------------------------------------------------------------


def test_minicpm3_keeps_its_scales_and_refuses_the_compact_form():
    """MiniCPM3 scales embeddings, residuals and logits; GqlaForCausalLM does not, so output="gqla" is refused."""
    source, converted = _source("minicpm3"), _converted("minicpm3", 2, "similarity")
    for field in ("scale_emb", "scale_depth", "dim_model_base"):
        assert getattr(converted.config, field) == getattr(source.config, field)
    with pytest.raises(ConversionError, match="does not reproduce MiniCPM3ForCausalLM.*scale_depth.*scale_emb"):
        gqla_compile.convert(source, num_groups=2, calibration=CALIBRATION, progress=False, output="gqla")


@pytest.mark.parametrize("name", ["deepseek_v2", "glm4_moe_lite"])
def test_moe_families_keep_experts_and_routers_bit_identical(name):
    source, converted = _source(name), _converted(name, 2, "similarity")
    moe = [n for n in source.state_dict() if "experts" in n or ".gate." in n]
    assert moe  # the tiny model really has experts and a router
    assert all(torch.equal(source.state_dict()[n], converted.state_dict()[n]) for n in moe)
    with pytest.raises(ConversionError, match="no place for.*experts.*MoE"):
        gqla_compile.convert(source, num_groups=2, calibration=CALIBRATION, progress=False, output="gqla")


def test_longcat_regroups_both_attention_blocks_of_each_layer():
    converted = _converted("longcat_flash", 2, "similarity")
    blocks, _ = find_latent_blocks(converted)
    layers = converted.config.num_layers
    assert [b.path for b in blocks] == [f"model.layers.{i}.self_attn.{j}" for i in range(layers) for j in range(2)]
    assert {b.dims.n_g for b in blocks} == {2}
    with pytest.raises(ConversionError, match="self_attn.0.*one per layer"):
        gqla_compile.convert(_source("longcat_flash"), num_groups=2, calibration=CALIBRATION, progress=False,
                             output="gqla")


def test_kimi_latent_layer_without_rope_and_linear_layers_left_alone():
    source, converted = _source("kimi_linear"), _converted("kimi_linear", 2, "similarity")
    blocks, _ = find_latent_blocks(source)
    assert [b.rope_layout for b in blocks] == ["none"] and blocks[0].dims.d_R > 0  # Kimi's MLA layers use no RoPE
    kinds = converted.config.layer_types
    linear = [i for i, kind in enumerate(kinds) if kind == "linear_attention"]
    assert linear
    for i in linear:
        prefix = f"model.layers.{i}."
        assert all(torch.equal(t, source.state_dict()[n]) for n, t in converted.state_dict().items() if n.startswith(prefix))


def test_dense_deepseek_compact_form_equals_the_family_form():
    from gqla_compile.modeling_gqla import GqlaForCausalLM
    from gqla_compile.tiny import tiny_deepseek_v3
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(tiny_deepseek_v3(num_attention_heads=8, num_key_value_heads=8)).eval()
    family = gqla_compile.convert(source, num_groups=4, calibration=CALIBRATION, progress=False)
    compact = gqla_compile.convert(source, num_groups=4, calibration=CALIBRATION, progress=False, output="gqla")
    assert isinstance(compact, GqlaForCausalLM) and compact.config.num_key_value_heads == 4
    tokens = _tokens()
    for got, want in zip(_prefill_and_decode(compact, tokens)[0], _prefill_and_decode(family, tokens)[0]):
        assert relative_error(got, want) < 1e-5


# --- saved, then loaded by stock transformers in a fresh process ---------------------------------------------------

def test_saved_regrouped_checkpoints_load_in_stock_transformers(tmp_path):
    tokens = _tokens(seed=5)
    folders = {}
    for name in SUPPORTED:
        model = _converted(name, _heads(name) // 2, "similarity")
        folders[name] = str(tmp_path / name)
        model.save_pretrained(folders[name])
    logits = logits_in_stock_transformers(list(folders.values()), tokens, tmp_path)
    for name, folder in folders.items():
        model = _converted(name, _heads(name) // 2, "similarity")
        with torch.no_grad():
            expected = model(input_ids=tokens, use_cache=False).logits
        assert torch.equal(logits[folder], expected), name
        saved = json.loads(open(os.path.join(folder, "config.json")).read())
        assert saved[RECORD_FIELD]["num_groups"] == _heads(name) // 2


# --- bad input ----------------------------------------------------------------------------------------------------


def test_group_count_must_divide_the_heads():
    with pytest.raises(ConversionError, match=r"num_groups=3 does not divide the 4 query heads.*\[1, 2, 4\]"):
        gqla_compile.convert(_source("deepseek_v2"), num_groups=3, calibration=CALIBRATION, progress=False)
    with pytest.raises(ConversionError, match="output='bogus' is not known"):
        gqla_compile.convert(_source("deepseek_v2"), num_groups=2, calibration=CALIBRATION, progress=False,
                             output="bogus")


# --- the real-weights benchmark's quick mode --------------------------------------------------------------------------


def test_regroup_benchmark_quick_mode_recovers_the_shuffled_groups(tmp_path):
    """A GQA model made into MLA exactly, heads shuffled: similarity grouping finds the groups, neighbour does not."""
    from benchmarks import regroup_mla

    result = regroup_mla.main(["--quick", "--out", str(tmp_path)])
    rows = {(row["num_groups"], row["grouping"]): row for row in result["rows"]}
    n_h, n_kv, layers = (result["model"][k] for k in ("num_attention_heads", "num_key_value_heads", "num_hidden_layers"))
    assert rows[(n_h, "-")]["logit_rel_error"] < 1e-5  # the MLA model is exact
    similar, neighbour = rows[(n_kv, "similarity")], rows[(n_kv, "neighbour")]
    assert similar["layers_with_original_groups"] == layers and similar["logit_rel_error"] < 1e-4
    assert abs(similar["perplexity"] / result["original_perplexity"] - 1) < 1e-4
    assert neighbour["layers_with_original_groups"] == 0 and neighbour["logit_rel_error"] > 1e-2
    assert (tmp_path / "regroup_mla.md").read_text().startswith("# Regrouping")
