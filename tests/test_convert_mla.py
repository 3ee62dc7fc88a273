"""TransGQLA for latent-attention checkpoints (issue 8): DeepSeek-V2/V3 MLA -> GQLA with fewer groups.

Models are tiny transformers DeepSeek-V2/V3 models (float32, random weights). Where grouping must matter the
key/value up-projections get planted structure: the even heads' keys (and values) live in one d_n-dim
subspace of the latent, the odd heads' in another, so neighbouring heads share nothing and heads two apart
share everything.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from _models import cache_elements, relative_error
from transformers import AutoModelForCausalLM, DynamicCache

import gqla_compile
from gqla_compile.checkpoint import load_model
from gqla_compile.cli import main as cli_main
from gqla_compile.conversion.calibration import random_token_sequences
from gqla_compile.cache_sizes import kv_cache_elements
from gqla_compile.errors import ConversionError
from gqla_compile.modeling_gqla import GqlaForCausalLM
from gqla_compile.passes.match import UP_PROJECTION_BIAS
from gqla_compile.tiny import tiny_deepseek_v2, tiny_deepseek_v3, tiny_llama

CALIBRATION = random_token_sequences(256, num_samples=8, seq_len=48, seed=1)
EIGHT_HEADS = dict(num_attention_heads=8, num_key_value_heads=8)


def _model(factory, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(factory(**overrides)).eval()


def _plant_two_head_families(model, noise=0.05):
    """kv_b_proj rows of even heads from one random basis, of odd heads from another (plus a little noise)."""
    cfg = model.config
    n_h, d_n, d_v, d_c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            bases = [torch.randn(d_n + d_v, d_c, generator=generator) for _ in range(2)]
            heads = []
            for h in range(n_h):
                mix_k = torch.randn(d_n, d_n, generator=generator)
                mix_v = torch.randn(d_v, d_v, generator=generator)
                base = bases[h % 2]
                block = torch.cat([mix_k @ base[:d_n], mix_v @ base[d_n:]]) / d_n
                heads.append(block + noise * block.std() * torch.randn(block.shape, generator=generator))
            layer.self_attn.kv_b_proj.weight.copy_(torch.cat(heads))
    return model


@pytest.fixture(scope="module")
def planted():
    return _plant_two_head_families(_model(tiny_deepseek_v3, **EIGHT_HEADS))


@pytest.fixture(scope="module")
def inputs():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _convert(model, num_groups, **options):
    """The compact form (GqlaForCausalLM): exact for these dense DeepSeek-layout models."""
    return gqla_compile.convert(model, num_groups=num_groups, calibration=CALIBRATION, progress=False, output="gqla",
                                **options)


# --- exactness ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, overrides, options, layout",
    [
        (tiny_deepseek_v3, {}, {"grouping": "similarity", "weighting": "loss"}, "interleaved"),
        (tiny_deepseek_v3, {"q_lora_rank": 24, "rope_interleave": False}, {"score_aware": True}, "rotate_half"),
        (tiny_deepseek_v2, {"q_lora_rank": 24}, {"weighting": "loss"}, "interleaved"),
    ],
    ids=["v3", "v3_q_lora_rotate_half", "v2_q_lora"],
)
def test_as_many_groups_as_heads_reproduces_the_model(factory, overrides, options, layout, inputs):
    source = _model(factory, **overrides)
    converted = _convert(source, source.config.num_attention_heads, **options)
    assert isinstance(converted, GqlaForCausalLM)
    assert relative_error(_logits(converted, inputs), _logits(source, inputs)) < 1e-5
    record = converted.config.conversion
    assert record["layers"][0]["rope_layout"] == layout  # V2: complex RoPE on pairs; V3: rope_interleave
    assert record["num_groups"] == source.config.num_attention_heads
    assert record["weighting"] == options.get("weighting") and record["score_aware"] == bool(options.get("score_aware"))


# --- quality ------------------------------------------------------------------------------------------------


def test_error_falls_as_groups_grow(planted, inputs):
    reference = _logits(planted, inputs)
    errors = {g: relative_error(_logits(_convert(planted, g), inputs), reference) for g in (1, 2, 4, 8)}
    assert errors[1] > errors[2] > errors[4] > errors[8], errors
    assert errors[8] < 1e-5 and errors[1] > 1e-2, errors


def test_similarity_grouping_finds_the_planted_families(planted, inputs):
    reference = _logits(planted, inputs)
    for g in (2, 4):
        neighbour = _convert(planted, g, grouping="neighbour")
        similar = _convert(planted, g, grouping="similarity")
        e_neighbour = relative_error(_logits(neighbour, inputs), reference)
        e_similar = relative_error(_logits(similar, inputs), reference)
        assert e_similar < 0.5 * e_neighbour, (g, e_similar, e_neighbour)
        record = similar.config.conversion
        for layer in record["layers"]:
            assert all(len({h % 2 for h in group}) == 1 for group in layer["groups"])  # one family per group
            assert layer["grouping_residual"] <= layer["neighbour_grouping_residual"]
        permutation = record["permutation"][0]
        assert sorted(permutation) == list(range(8)) and permutation != list(range(8))
        assert record["grouping"] == "similarity" and record["num_groups"] == g


def test_loss_weighting_is_recorded_and_stays_close(planted, inputs):
    reference = _logits(planted, inputs)
    plain = relative_error(_logits(_convert(planted, 2, grouping="similarity"), inputs), reference)
    weighted_model = _convert(planted, 2, grouping="similarity", weighting="loss")
    weighted = relative_error(_logits(weighted_model, inputs), reference)
    assert weighted < 2 * plain + 1e-3
    assert weighted_model.config.conversion["calibration"]["num_tokens"] == 8 * 48


# --- the compiler's two paths on the result -------------------------------------------------------------------


def test_converted_model_runs_both_paths_with_a_smaller_grouped_cache(planted):
    source_model = planted
    converted = _convert(source_model, 2, grouping="similarity")
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    tokens, caches = {}, {}
    for path in ("absorbed", "grouped"):
        # the RoPE key copied into each group: the grouped cache then scales with n_g alone
        model = gqla_compile.optimize(copy.deepcopy(converted), path=path, target="h20", rope_key="copied",
                                      compile=False)
        with torch.no_grad():
            tokens[path] = model.generate(prompt, max_new_tokens=8, do_sample=False)
            cache = DynamicCache()
            model(input_ids=prompt, cache=cache, use_cache=True)
        caches[path] = cache_elements(cache)
    assert torch.equal(tokens["absorbed"], tokens["grouped"])
    per_token = caches["grouped"] // (prompt.numel() * converted.config.num_hidden_layers)
    assert per_token == kv_cache_elements(converted.config, "grouped")
    unconverted = kv_cache_elements(source_model.config, "grouped")
    assert per_token * source_model.config.num_attention_heads == unconverted * 2  # n_g / n_h of the original


# --- bad input ------------------------------------------------------------------------------------------------


def test_num_groups_must_divide_the_heads(planted):
    with pytest.raises(ConversionError, match=r"num_groups=3 does not divide the 8 query heads.*\[1, 2, 4, 8\]"):
        _convert(planted, 3)
    with pytest.raises(ConversionError, match="grouping='bogus'"):
        _convert(planted, 2, grouping="bogus")


def test_a_model_without_latent_attention_is_refused():
    llama = _model(tiny_llama)
    with pytest.raises(ConversionError, match="num_groups=1.*no latent attention.*2 groups"):
        _convert(llama, 1)
    with pytest.raises(ConversionError, match="grouping='similarity'.*no latent attention"):
        _convert(llama, None, grouping="similarity")


CLI_CALIBRATION = ["--num-samples", "4", "--seq-len", "32"]


@pytest.mark.parametrize(
    "source, flags, message",
    [
        ("tiny-deepseek-v3", ["--num-groups", "3"], "num_groups=3 does not divide"),
        ("tiny-llama", ["--num-groups", "1"], "no latent attention"),
    ],
)
def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys, source, flags, message):
    code = cli_main(["-q", "convert", source, str(tmp_path / "out"), *flags, *CLI_CALIBRATION])
    assert code == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_converts_a_latent_checkpoint_in_its_family(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["-q", "convert", "tiny-deepseek-v3", str(out), "--num-groups", "2", "--grouping", "similarity",
                     "--weighting", "loss", *CLI_CALIBRATION])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "(DeepseekV3ForCausalLM, 2 groups" in printed and "(50.00 %)" in printed  # 4 heads -> 2 groups
    model = load_model(out)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    record = model.config.gqla_conversion
    assert (record["num_groups"], record["grouping"], record["weighting"]) == (2, "similarity", "loss")
    assert record["calibration"]["num_sequences"] == 4 and len(record["permutation"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert kv_cache_elements(model.config, "grouped") * 2 == kv_cache_elements(load_model("tiny-deepseek-v3").config, "grouped")
    assert torch.isfinite(_logits(model, torch.randint(0, 256, (1, 8)))).all()


# --- the benchmark's quick mode -------------------------------------------------------------------------------


def test_benchmark_quick_mode_writes_its_results(tmp_path):
    from benchmarks import convert_mla

    convert_mla.main(["--quick", "--out", str(tmp_path)])
    import json

    result = json.loads((tmp_path / "convert_mla.json").read_text())
    rows = result["rows"]
    assert {row["num_groups"] for row in rows} >= {result["model"]["num_attention_heads"], 1}
    full = [row for row in rows if row["num_groups"] == result["model"]["num_attention_heads"]]
    assert all(abs(row["perplexity"] / result["original_perplexity"] - 1) < 1e-3 for row in full)
    assert (tmp_path / "convert_mla.md").read_text().startswith("#")


def test_a_latent_block_the_detector_cannot_trace_is_named_in_a_warning():
    """A block left out is never silent: the converted model keeps it as it was, and the warning says which and why."""
    model = _model(tiny_deepseek_v3)
    attention = model.model.layers[1].self_attn

    class DataDependentAttention(type(attention)):
        def forward(self, hidden_states, *args, **kwargs):
            if hidden_states.sum() > 0:  # a branch on a value: torch.export cannot trace it
                hidden_states = hidden_states + 0
            return super().forward(hidden_states, *args, **kwargs)

    attention.__class__ = DataDependentAttention
    expected = r"1 latent block\(s\) converted, 1 block\(s\) with attention left as they are \(model\.layers\.1\.self_attn"
    with pytest.warns(gqla_compile.PartialRewriteWarning, match=expected):
        converted = gqla_compile.convert(model, num_groups=1, calibration=CALIBRATION, progress=False)
    assert torch.equal(converted.model.layers[1].self_attn.kv_b_proj.weight, attention.kv_b_proj.weight)
    assert not torch.equal(converted.model.layers[0].self_attn.kv_b_proj.weight,
                           model.model.layers[0].self_attn.kv_b_proj.weight)


def _bias_up_projection(attention, seed: int = 0) -> None:
    """Give the block's kv_b_proj a random non-zero bias (same weight): latent attention whose up-projection
    has a bias, which no path absorbs."""
    old = attention.kv_b_proj
    biased = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(old.weight)
        biased.bias.copy_(0.15 * torch.randn(old.out_features, generator=torch.Generator().manual_seed(seed)))
    attention.kv_b_proj = biased


def test_optimize_and_convert_name_the_same_reason_for_a_biased_up_projection():
    """One detection entry point: both leave the biased block as it was, with the same named reason."""
    model = _model(tiny_deepseek_v3)
    _bias_up_projection(model.model.layers[1].self_attn)
    expected = re.escape(f"model.layers.1.self_attn: {UP_PROJECTION_BIAS}")
    with pytest.warns(gqla_compile.PartialRewriteWarning, match=expected):
        converted = gqla_compile.convert(model, num_groups=1, calibration=CALIBRATION, progress=False)
    with pytest.warns(gqla_compile.PartialRewriteWarning, match=expected):
        optimized = gqla_compile.optimize(copy.deepcopy(model), target="h100", compile=False)
    assert [layer.module_path for layer in optimized.gqla_optimization.layers] == ["model.layers.0.self_attn"]
    assert ("model.layers.1.self_attn", UP_PROJECTION_BIAS) in optimized.gqla_optimization.skipped
    kept, source = converted.model.layers[1].self_attn.kv_b_proj, model.model.layers[1].self_attn.kv_b_proj
    assert torch.equal(kept.weight, source.weight) and torch.equal(kept.bias, source.bias)
    assert not torch.equal(converted.model.layers[0].self_attn.kv_b_proj.weight,
                           model.model.layers[0].self_attn.kv_b_proj.weight)  # the other block was regrouped

    for layer in model.model.layers:  # every block biased: both refuse, naming the reason
        _bias_up_projection(layer.self_attn, seed=1)
    with pytest.raises(ConversionError, match=re.escape(UP_PROJECTION_BIAS)):
        gqla_compile.convert(model, num_groups=1, calibration=CALIBRATION, progress=False)
    with pytest.raises(gqla_compile.NoLatentAttentionError, match=re.escape(UP_PROJECTION_BIAS)):
        gqla_compile.optimize(model, target="h100", path="absorbed", compile=False)


@pytest.mark.parametrize("factory", [tiny_deepseek_v2, tiny_deepseek_v3])
def test_a_bfloat16_model_converts_and_optimizes(factory):
    """transformers loads checkpoints in their own dtype (bfloat16 for most): detection's RoPE-pair test and every
    self-check work to that dtype's precision."""
    source = _model(factory).to(torch.bfloat16)
    tokens = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = source(tokens).logits
    compact = _convert(source, None)
    assert isinstance(compact, GqlaForCausalLM) and compact.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative_error(compact(tokens).logits, expected) < 3e-2
    for path in ("absorbed", "grouped"):
        optimized = gqla_compile.optimize(copy.deepcopy(source), target="h100", path=path, compile=False)
        assert all(layer.verification_error < 3e-2 for layer in optimized.gqla_optimization.layers)
        with torch.no_grad():
            assert relative_error(optimized(tokens).logits, expected) < 3e-2
