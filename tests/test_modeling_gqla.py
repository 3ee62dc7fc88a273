"""The GQLA model type: shapes, attention back-ends, caches, padding, DeepSeek-V3 equivalence, rotary tables,
save/load through the Auto classes, config validation and capture with torch.export. Tiny float32 models."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3ForCausalLM,
    DynamicCache,
    LlamaConfig,
    StaticCache,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import gqla_compile  # noqa: F401  registers "gqla"
from gqla_compile.configuration_gqla import GqlaConfig
from gqla_compile.modeling_gqla import GqlaForCausalLM, GqlaRotaryEmbedding
from gqla_compile.tiny import tiny_deepseek_v3, tiny_gqla

VOCAB = 256


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere (biases and norm weights too, which init leaves at 0 / 1), so that every
    weight matters to the comparisons."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model.eval()


def build(attn: str = "sdpa", **overrides) -> GqlaForCausalLM:
    config = tiny_gqla(**overrides)
    return randomize_(GqlaForCausalLM._from_config(config, attn_implementation=attn))


def twin(model: GqlaForCausalLM, attn: str) -> GqlaForCausalLM:
    """Same weights, another attention implementation."""
    other = GqlaForCausalLM._from_config(model.config, attn_implementation=attn)
    other.load_state_dict(model.state_dict())
    return other.eval()


def ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length))


def greedy(model, input_ids, n: int = 32, **kwargs) -> torch.Tensor:
    return model.generate(input_ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)


# ----------------------------------------------------------------------------------------------- basics


def test_forward_and_generate_run():
    model = build()
    x = ids(2, 7)
    out = model(x, attention_mask=torch.ones_like(x))
    assert out.logits.shape == (2, 7, VOCAB)
    assert out.cache is not None and out.cache.get_seq_length() == 7
    layer = out.cache.layers[0]
    assert layer.keys.shape == (2, 1, 7, 32) and layer.values.shape == (2, 1, 7, 8)  # latent, RoPE key
    gen = greedy(model, x, attention_mask=torch.ones_like(x))
    assert gen.shape == (2, 7 + 32) and torch.equal(gen[:, :7], x)


def test_weight_layout():
    model = build(q_lora_rank=16, kv_a_layernorm=False, attention_output_bias=True)
    attn = model.model.layers[0].self_attn
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (16, 64),
        "q_a_layernorm.weight": (16,),
        "q_b_proj.weight": (4 * 24, 16),
        "kv_a_proj_with_mqa.weight": (32 + 8, 64),
        "kv_b_proj.weight": (2 * (16 + 16), 32),
        "o_proj.weight": (64, 4 * 16),
        "o_proj.bias": (64,),
    }


CASES = [
    dict(num_key_value_heads=n_g, q_lora_rank=q_lora, kv_a_layernorm=norm, attention_bias=bias,
         attention_output_bias=bias)
    for n_g, q_lora, norm, bias in itertools.product([1, 2, 4], [None, 16], [True, False], [False, True])
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sdpa_matches_eager(overrides):
    model = build("sdpa", **overrides)
    eager = twin(model, "eager")
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding on one row exercises the mask path
    with torch.no_grad():
        a = model(x, attention_mask=mask).logits
        b = eager(x, attention_mask=mask).logits
    assert rel_err(a[0], b[0]) < 1e-5
    assert rel_err(a[1, 3:], b[1, 3:]) < 1e-5


def test_output_attentions_eager():
    model = build("eager")
    x = ids(1, 6)
    out = model(x, output_attentions=True)
    assert len(out.attentions) == 2
    assert out.attentions[0].shape == (1, 4, 6, 6)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1, 4, 6))


# ----------------------------------------------------------------------------------------------- caches


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_incremental_decoding_matches_full_forward(attn):
    model = build(attn, num_key_value_heads=2, q_lora_rank=16)
    x = ids(2, 10)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        steps = []
        for t in range(x.shape[1]):
            out = model(x[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    # The cache holds the latent (one head, d_c) and the RoPE key (one head, d_R), as DeepSeek-V3's does.
    assert cache.layers[0].keys.shape == (2, 1, 10, 32)
    assert cache.layers[0].values.shape == (2, 1, 10, 8)


def test_prefill_then_decode_and_deprecated_past_key_values():
    model = build(num_key_value_heads=4)
    x = ids(1, 12)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :8], use_cache=True)
        with pytest.warns(Warning):
            rest = model(x[:, 8:], past_key_values=out.cache, use_cache=True).logits
    assert rel_err(torch.cat([out.logits, rest], dim=1), full) < 1e-5


def test_static_cache_generate_matches_dynamic():
    model = build(num_key_value_heads=2)
    x = ids(1, 6)
    dynamic = greedy(model, x)
    out = greedy(model, x, cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(dynamic, out.sequences)
    assert isinstance(out.cache, StaticCache)
    # Layers sized lazily from the first update, key and value head dims apart: latent d_c, RoPE key d_R.
    assert out.cache.layers[0].keys.shape[1::2] == (1, 32)
    assert out.cache.layers[0].values.shape[1::2] == (1, 8)


def test_generate_with_given_cache_and_deprecated_past_key_values():
    model = build(num_key_value_heads=2)
    x = ids(1, 6)
    reference = greedy(model, x, n=8)
    cache = DynamicCache(config=model.config)
    assert torch.equal(greedy(model, x, n=8, cache=cache), reference)
    assert cache.get_seq_length() == 6 + 8 - 1
    with pytest.warns(FutureWarning):
        old = greedy(model, x, n=8, past_key_values=DynamicCache(config=model.config))
    assert torch.equal(old, reference)


def test_left_padded_batch_generate_matches_single_rows():
    model = build(num_key_value_heads=2)
    a, b = ids(1, 8), ids(1, 5)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = greedy(model, batch, attention_mask=mask)
    alone_a = greedy(model, a)
    alone_b = greedy(model, b)
    assert torch.equal(together[0], alone_a[0])
    assert torch.equal(together[1, 3:], alone_b[0])


# ----------------------------------------------------------------------------------------------- DeepSeek layout


def test_mla_case_matches_deepseek_v3():
    """n_g = n_h with DeepSeek-V3's weights gives DeepSeek-V3's logits: the layout is DeepSeek's."""
    ours = build("eager", num_key_value_heads=4, kv_a_layernorm=True)
    ds_config = tiny_deepseek_v3(rope_interleave=False)
    ds_config._attn_implementation = "eager"
    ds = DeepseekV3ForCausalLM(ds_config).eval()
    missing, unexpected = ds.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    x = ids(2, 11)
    with torch.no_grad():
        assert rel_err(ours(x).logits, ds(x).logits) < 1e-5


# ----------------------------------------------------------------------------------------------- RoPE tables

ROPE_PARAMETERS = [
    dict(rope_type="default", rope_theta=1e5),
    dict(rope_type="llama3", rope_theta=1e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=64),
    dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=128),
    dict(rope_type="linear", rope_theta=1e4, factor=2.0),
]


@pytest.mark.parametrize("rope_parameters", ROPE_PARAMETERS, ids=lambda p: p["rope_type"])
def test_rope_frequency_selection_matches_llama_table(rope_parameters):
    indices = [0, 5, 17, 31]  # d_R = 8 -> 4 pairs, chosen from a head-dim-64 table
    config = tiny_gqla(rope_frequency_dim=64, rope_frequency_indices=indices, rope_parameters=dict(rope_parameters))
    llama = LlamaConfig(hidden_size=64 * 4, num_attention_heads=4, head_dim=64, max_position_embeddings=512,
                        rope_parameters=dict(rope_parameters))
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.arange(0, 300, 7).unsqueeze(0)
    cos, sin = GqlaRotaryEmbedding(config)(x, pos)
    ref_cos, ref_sin = LlamaRotaryEmbedding(llama)(x, pos)
    cols = indices + [i + 32 for i in indices]  # HF layout: cat(freqs, freqs)
    torch.testing.assert_close(cos, ref_cos[..., cols], rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin[..., cols], rtol=0, atol=0)


def test_default_rope_table_is_deepseeks():
    config = tiny_gqla()
    rotary = GqlaRotaryEmbedding(config)
    expected = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float) / 8))
    torch.testing.assert_close(rotary.inv_freq, expected)


# ----------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_round_trip(tmp_path, tie):
    model = build(tie_word_embeddings=tie, rope_frequency_dim=32, rope_frequency_indices=[1, 3, 8, 15],
                  kv_a_layernorm=False, attention_bias=True, conversion={"source": "test", "method": "none"})
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files), files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GqlaForCausalLM)
    assert loaded.config.model_type == "gqla"
    assert loaded.config.rope_frequency_indices == [1, 3, 8, 15]
    assert loaded.config.conversion == {"source": "test", "method": "none"}
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)
    x = ids(2, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# ----------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(qk_rope_head_dim=6 + 1), "qk_rope_head_dim"),
        (dict(rope_frequency_indices=[0, 1, 2]), "rope_frequency_indices"),
        (dict(rope_frequency_dim=16, rope_frequency_indices=[0, 1, 2, 8]), "rope_frequency_indices"),
        (dict(rope_frequency_dim=4), "rope_frequency_dim"),
        (dict(rope_frequency_indices=[0, 1, 2, 3], rope_layer_frequency_indices=[[0, 1, 2, 3]] * 2), "not both"),
        (dict(rope_layer_frequency_indices=[[0, 1, 2, 3]]), "rope_layer_frequency_indices"),
        (dict(rope_frequency_dim=16, rope_layer_frequency_indices=[[0, 1, 2, 3], [0, 1, 2, 8]]),
         "rope_layer_frequency_indices"),
    ],
)
def test_bad_configs_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_gqla(**overrides)


def test_config_defaults():
    config = GqlaConfig()
    assert config.model_type == "gqla"
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert config.qk_head_dim == config.qk_nope_head_dim + config.qk_rope_head_dim


def test_softmax_scale():
    model = build(softmax_scale=0.125)
    assert model.model.layers[0].self_attn.scaling == 0.125
    assert build().model.layers[0].self_attn.scaling == pytest.approx((16 + 8) ** -0.5)


# ----------------------------------------------------------------------------------------------- capture


def test_attention_exports_with_dynamic_batch_and_length():
    model = build(num_key_value_heads=2)
    attn = model.model.layers[0].self_attn
    rotary = model.model.rotary_emb

    def inputs(batch: int, length: int):
        h = torch.randn(batch, length, 64)
        pos = torch.arange(length).unsqueeze(0).expand(batch, -1)
        return h, rotary(h, pos)

    h, (cos, sin) = inputs(2, 7)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    dyn = {0: batch, 1: seq}
    exported = torch.export.export(attn, (h, (cos, sin), None), dynamic_shapes=(dyn, (dyn, dyn), None))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("scaled_dot_product_attention" in op for op in ops), ops
    captured = exported.module()
    for b, t in [(2, 7), (3, 13), (1, 2)]:
        h, emb = inputs(b, t)
        with torch.no_grad():
            expected, _ = attn(h, emb, None)
            got = captured(h, emb, None)[0]
        assert rel_err(got, expected) < 1e-5
