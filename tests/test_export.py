"""``gqla_compile.export`` / ``gqla-compile export``: a GqlaForCausalLM as a DeepSeek-V3 checkpoint (issue 12).

The GQLA model is tiny, with everything DeepSeek-V3 has no field for but an identity carries exactly: a
q_lora query with biases, a softmax scale of its own, a RoPE frequency subset of a larger table (evenly spaced,
in shuffled order), random norm gains and biases. Stock ``DeepseekV3ForCausalLM`` must load it in a fresh
process that never imports gqla_compile and give the same logits; the compiler's probing must find the groups.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from _families import logits_in_stock_transformers, randomize_norms_and_biases
from _models import relative_error
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.cli import main as cli_main
from gqla_compile.conversion.calibration import random_token_sequences
from gqla_compile.conversion.mla import find_latent_blocks
from gqla_compile.errors import ConversionError
from gqla_compile.tiny import tiny_gqla, tiny_llama

EXPRESSIBLE = dict(q_lora_rank=24, attention_bias=True, attention_output_bias=True, softmax_scale=0.3,
                   rope_frequency_dim=32, rope_frequency_indices=[6, 0, 2, 4])


def _gqla(**overrides):
    torch.manual_seed(0)
    return randomize_norms_and_biases(AutoModelForCausalLM.from_config(tiny_gqla(**overrides)).eval())


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))


def test_exported_checkpoint_loads_in_stock_deepseek_v3_with_the_same_logits(tmp_path, tokens, caplog):
    model = _gqla(**EXPRESSIBLE)
    out = tmp_path / "ds"
    with caplog.at_level(logging.WARNING, logger="gqla_compile.exporting"):
        gqla_compile.export(model, out, format="deepseek_v3")
    assert "attention biases" in caplog.text  # engines may ignore them: said so
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # written atomically, no leftovers
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
    logits = logits_in_stock_transformers([str(out)], tokens, tmp_path)[str(out)]
    assert relative_error(logits, expected) < 1e-5
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM" and loaded.config.rope_interleave
    assert not any("experts" in name for name in loaded.state_dict())
    blocks, _ = find_latent_blocks(loaded)  # kv_b_proj repeated per group: the probing finds the groups again
    assert {b.dims.n_g for b in blocks} == {model.config.num_key_value_heads}
    assert loaded.config.gqla_conversion["num_groups"] == model.config.num_key_value_heads


def test_export_of_a_compact_conversion_decodes_like_it(tmp_path):
    """A GqlaForCausalLM made by regrouping a DeepSeek-V3 model (output="gqla") round-trips to DeepSeek-V3."""
    from gqla_compile.tiny import tiny_deepseek_v3

    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(tiny_deepseek_v3()).eval()
    compact = gqla_compile.convert(source, num_groups=2, calibration=random_token_sequences(256, 4, 24, seed=1),
                                   progress=False, output="gqla")
    gqla_compile.export(compact, tmp_path / "ds")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").eval()
    prompt = torch.tensor([[5, 17, 99, 3, 250, 42, 8, 61]])
    with torch.no_grad():
        want = compact.generate(prompt, max_new_tokens=8, do_sample=False)
        got = exported.generate(prompt, max_new_tokens=8, do_sample=False)
    assert len(set(want[0, 8:].tolist())) > 1  # not one repeated token
    assert torch.equal(got, want)


# --- padding to the 512 + 64 latent MLA kernels take (issue 22) -------------------------------------------------

#: The README's headline TransGQLA setting (d_R 32, d_c 76), with a q_lora query, biases, a softmax scale of its
#: own and per-layer RoPE frequency tables drawn from a 64-dim table (as TransGQLA's FreqFold writes them).
HEADLINE = dict(kv_lora_rank=76, qk_rope_head_dim=32, qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=24,
                attention_bias=True, attention_output_bias=True, softmax_scale=0.2, rope_frequency_dim=64,
                rope_layer_frequency_indices=[list(range(0, 32, 2)), [5, 0, 9, 2, 31, 4, 12, 6, 17, 20, 11, 27, 1,
                                                                      30, 23, 15]],
                initializer_range=0.15, max_position_embeddings=512)


def _greedy(model, prompt, steps=12):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)[0, prompt.shape[1]:]


def test_padded_export_of_a_headline_gqla_model_loads_in_stock_deepseek_v3_with_the_same_logits(tmp_path, caplog):
    model = _gqla(**HEADLINE)
    out = tmp_path / "ds"
    with caplog.at_level(logging.WARNING, logger="gqla_compile.exporting"):
        gqla_compile.export(model, out)  # automatic: 76 + 32 is not 512 + 64
    warning = next(r.getMessage() for r in caplog.records if "padding the latent" in r.getMessage())
    assert "from 76 + 32 to 512 + 64" in warning and "864 -> 4608 bytes per token" in warning
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM"
    assert (loaded.config.kv_lora_rank, loaded.config.qk_rope_head_dim) == (512, 64)
    assert loaded.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    padded_from = loaded.config.gqla_conversion["padded_from"]
    assert (padded_from["kv_lora_rank"], padded_from["qk_rope_head_dim"]) == (76, 32)
    assert padded_from["rope_pairs"][0] == list(range(0, 32, 2))  # table index k of 64 is pair k: same theta
    assert padded_from["rope_pairs"][1] == HEADLINE["rope_layer_frequency_indices"][1]
    # positions to the end of the table, so that the slow RoPE pairs turn too
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    positions = torch.stack([torch.arange(40), torch.arange(40) + 470])
    with torch.no_grad():
        expected = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
        got = loaded(input_ids=tokens, position_ids=positions, use_cache=False).logits
    assert relative_error(got, expected) < 1e-5
    stock = logits_in_stock_transformers([str(out)], tokens, tmp_path)[str(out)]  # no gqla_compile imported
    with torch.no_grad():
        assert relative_error(stock, model(input_ids=tokens, use_cache=False).logits) < 1e-5
    prompt = tokens[:1, :24]
    want = _greedy(model, prompt)
    assert len(set(want.tolist())) > 1  # not one repeated token
    assert torch.equal(_greedy(loaded, prompt), want)
    # the padding is zero rows and columns: the model's dims carry everything
    attention = loaded.model.layers[1].self_attn
    assert attention.kv_b_proj.weight[:, 76:].abs().max() == 0
    assert attention.kv_a_proj_with_mqa.weight[76:512].abs().max() == 0
    rope = attention.kv_a_proj_with_mqa.weight[512:].reshape(32, 2, -1)
    used = HEADLINE["rope_layer_frequency_indices"][1]
    assert rope[[j for j in range(32) if j not in used]].abs().max() == 0 and rope[used].abs().amin(-1).min() > 0


def test_padded_export_of_a_transgqla_result_reproduces_it(tmp_path):
    """A real TransGQLA conversion (no latent norm: an inert one, padded; FreqFold's table of the Llama's
    64-dim heads) at the headline (d_R 32, d_c 76), exported for MLA engines."""
    torch.manual_seed(0)
    llama = randomize_norms_and_biases(AutoModelForCausalLM.from_config(tiny_llama(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-6,
        initializer_range=0.15)).eval())
    converted = gqla_compile.convert(llama, kv_lora_rank=76, qk_rope_head_dim=32, progress=False,
                                     calibration=random_token_sequences(256, 4, 32, seed=1))
    assert converted.config.rope_frequency_dim == 64 and not converted.config.kv_a_layernorm
    gqla_compile.export(converted, tmp_path / "ds", pad_latent=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").eval()
    assert (loaded.config.kv_lora_rank, loaded.config.qk_rope_head_dim) == (512, 64)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = converted(input_ids=tokens, use_cache=False).logits
        got = loaded(input_ids=tokens, use_cache=False).logits
    assert relative_error(got, expected) < 1e-5
    prompt = tokens[:1, :24]
    want = _greedy(converted, prompt)
    assert len(set(want.tolist())) > 1
    assert torch.equal(_greedy(loaded, prompt), want)


def test_a_rope_subset_no_small_table_holds_is_exact_once_padded(tmp_path, tokens):
    """Frequencies 0, 1, 3, 6 of a 32-dim table: no 8-dim DeepSeek-V3 table holds them, the 64-dim one does."""
    make = lambda: _gqla(rope_frequency_dim=32, rope_frequency_indices=[0, 1, 3, 6])  # noqa: E731
    with pytest.raises(ConversionError, match="none holds them all.*pad_latent=True places them in a 64-dim table"):
        gqla_compile.export(make(), tmp_path / "small", pad_latent=False)
    model = make()
    gqla_compile.export(model, tmp_path / "ds", pad_latent=True)
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")(input_ids=tokens, use_cache=False).logits
    assert relative_error(got, expected) < 1e-5
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_a_latent_already_512_plus_64_is_not_padded(tmp_path, caplog):
    model = _gqla(kv_lora_rank=512, qk_rope_head_dim=64)
    with caplog.at_level(logging.WARNING, logger="gqla_compile.exporting"):
        gqla_compile.export(model, tmp_path / "ds")
    assert "padding" not in caplog.text
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").config
    assert (config.kv_lora_rank, config.qk_rope_head_dim) == (512, 64)
    assert "padded_from" not in config.gqla_conversion


YARN = dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 128})
#: What cannot be padded: a latent or RoPE key larger than 512 + 64, and a RoPE whose 64-dim DeepSeek-V3 table
#: differs from the model's (YaRN's ramp moves with the number of dims).
UNPADDABLE = {
    "latent_over_512": (dict(kv_lora_rank=520),
                        "latent is 520 \\+ 8 dims.*larger than the 512 \\+ 64.*pad_latent=False"),
    "rope_over_64": (dict(qk_rope_head_dim=72, qk_nope_head_dim=8),
                     "latent is 32 \\+ 72 dims.*larger than the 512 \\+ 64.*pad_latent=False"),
    "yarn_at_64_dims": (YARN, "no DeepSeek-V3 RoPE of 64 dims.*scaled rope type"),
}


@pytest.mark.parametrize("dims, message", [
    *UNPADDABLE.values(),
    (dict(rope_frequency_dim=128, rope_frequency_indices=[0, 1, 40, 63]), "no DeepSeek-V3 RoPE of 64 dims"),
], ids=[*UNPADDABLE, "rope_no_table_holds"])
def test_what_cannot_be_padded_is_refused_when_padding_is_asked_for(tmp_path, dims, message):
    with pytest.raises(ConversionError, match=message):
        gqla_compile.export(_gqla(**dims), tmp_path / "ds", pad_latent=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dims", [dims for dims, _ in UNPADDABLE.values()], ids=UNPADDABLE)
def test_what_cannot_be_padded_is_exported_unpadded_by_default_with_a_warning(tmp_path, tokens, caplog, dims):
    model = _gqla(**dims)
    with caplog.at_level(logging.WARNING, logger="gqla_compile.exporting"):
        gqla_compile.export(model, tmp_path / "ds")
    assert "MLA kernels built for 512 + 64" in caplog.text and "cannot be padded" in caplog.text
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")
    config = model.config
    assert (loaded.config.kv_lora_rank, loaded.config.qk_rope_head_dim) == (config.kv_lora_rank,
                                                                            config.qk_rope_head_dim)
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
        assert relative_error(loaded(input_ids=tokens, use_cache=False).logits, expected) < 1e-5


def test_a_rope_type_engines_read_otherwise_is_exported_with_a_warning(tmp_path, tokens, caplog):
    """Linear scaling keeps its table at 64 dims (padded exactly); vLLM's DeepSeek-V3 would read it as YaRN."""
    model = _gqla(qk_rope_head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with caplog.at_level(logging.WARNING, logger="gqla_compile.exporting"):
        gqla_compile.export(model, tmp_path / "ds")
    assert "rope_type 'linear'" in caplog.text and "vLLM reads every rope type other than default" in caplog.text
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")
    assert loaded.config.qk_rope_head_dim == 64 and loaded.config.rope_parameters["rope_type"] == "linear"
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
        assert relative_error(loaded(input_ids=tokens, use_cache=False).logits, expected) < 1e-5


# --- what DeepSeek-V3 cannot express: refused, nothing written ----------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _gqla(kv_a_layernorm=False, rms_norm_eps=1e-5), "no latent norm.*rms_norm_eps=1e-05"),
        (lambda: _gqla(rope_frequency_dim=128, rope_frequency_indices=[0, 1, 40, 63]), "none holds them all"),
        (lambda: _gqla(mlp_bias=True), "MLP has biases"),
        (lambda: _gqla(attention_bias=True), "q_proj has a bias"),
        (lambda: AutoModelForCausalLM.from_config(tiny_llama()), "export writes a GqlaForCausalLM"),
    ],
    ids=["no_latent_norm", "irregular_rope_subset", "mlp_bias", "q_proj_bias", "not_gqla"],
)
def test_what_deepseek_v3_cannot_express_is_refused(tmp_path, make, message):
    for pad_latent in (None, False):
        with pytest.raises(ConversionError, match=message):
            gqla_compile.export(make(), tmp_path / "ds", pad_latent=pad_latent)
    assert os.listdir(tmp_path) == []


def test_a_transgqla_result_without_latent_norm_exports_with_an_inert_norm(tmp_path, tokens):
    """TransGQLA results have no latent norm; DeepSeek-V3 always has one: the export makes it inert (exact)."""
    torch.manual_seed(0)
    llama = randomize_norms_and_biases(AutoModelForCausalLM.from_config(tiny_llama(rms_norm_eps=1e-6)).eval())
    converted = gqla_compile.convert(llama, kv_lora_rank=16, qk_rope_head_dim=16, progress=False,
                                     calibration=random_token_sequences(256, 4, 16, seed=1))
    assert not converted.config.kv_a_layernorm
    out = tmp_path / "ds"
    gqla_compile.export(converted, out)
    with torch.no_grad():
        expected = converted(input_ids=tokens, use_cache=False).logits
    logits = logits_in_stock_transformers([str(out)], tokens, tmp_path)[str(out)]
    assert relative_error(logits, expected) < 1e-5
    gains = AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.kv_a_layernorm.weight
    d_c = converted.config.kv_lora_rank
    assert gains[:d_c].min() > 1e3  # the latent reaches the norm scaled far below its epsilon
    assert gains[d_c:].abs().max() == 0  # padded by default: zero dims


def test_a_large_latent_stays_exact_through_the_inert_norm(tmp_path, tokens):
    """The inert norm's scale comes from a bound over every input, not from a sample: large weights stay exact."""
    model = _gqla(kv_a_layernorm=False, **EXPRESSIBLE)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_proj_with_mqa.weight.mul_(300.0)
            layer.input_layernorm.weight.mul_(5.0)
    gqla_compile.export(model, tmp_path / "ds")
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")(input_ids=tokens, use_cache=False).logits
    assert relative_error(got, expected) < 1e-5


def test_an_export_that_does_not_reproduce_the_model_is_refused(tmp_path, monkeypatch):
    """The export checks itself: a wrong weight layout is an error and nothing is written."""
    from gqla_compile import exporting

    layout = exporting._deepseek_v3_state

    def swapped_heads(model, pair_order, scale):
        state = layout(model, pair_order, scale)
        name = "model.layers.0.self_attn.o_proj.weight"
        state[name] = state[name].flip(1)
        return state

    monkeypatch.setattr(exporting, "_deepseek_v3_state", swapped_heads)
    with pytest.raises(ConversionError, match="does not reproduce the model"):
        gqla_compile.export(_gqla(), tmp_path / "ds")
    assert os.listdir(tmp_path) == []


def test_existing_output_folder_and_unknown_format_are_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        gqla_compile.export(_gqla(), tmp_path / "ds")
    assert os.listdir(tmp_path / "ds") == ["keep.txt"]
    with pytest.raises(ConversionError, match="format='vllm' is not known"):
        gqla_compile.export(_gqla(), tmp_path / "other", format="vllm")
    assert sorted(os.listdir(tmp_path)) == ["ds"]


# --- the command line ------------------------------------------------------------------------------------------------


def test_cli_exports_and_refuses_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli_main(["-q", "export", "tiny-gqla", str(out)]) == 0, capsys.readouterr().err
    assert "latent 32 + 8) -> " in (printed := capsys.readouterr().out) and "(deepseek_v3, latent 512 + 64)" in printed
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert config.model_type == "deepseek_v3" and (config.kv_lora_rank, config.qk_rope_head_dim) == (512, 64)
    compact = tmp_path / "compact"
    assert cli_main(["-q", "export", "tiny-gqla", str(compact), "--no-pad-latent"]) == 0, capsys.readouterr().err
    assert "(deepseek_v3, latent 32 + 8)" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(compact).config.kv_lora_rank == 32
    assert cli_main(["-q", "export", "tiny-gqla", str(tmp_path / "big"), "--pad-latent"]) == 0
    capsys.readouterr()
    before = sorted(os.listdir(out))
    assert cli_main(["-q", "export", "tiny-gqla", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before


def test_cli_convert_refuses_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code = cli_main(["-q", "convert", "tiny-deepseek-v3", str(out), "--num-groups", "2", "--num-samples", "2",
                     "--seq-len", "8"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert os.listdir(out) == []
