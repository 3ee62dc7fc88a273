"""Each graph pass on a real tiny model's captured attention block, counted as vLLM's pass tests count: the
``torch.ops.aten`` OpOverloads of the GraphModule before and after the pass.

A pass's tail is traced from plain PyTorch (``F.linear``, ``torch.cat``), so a graph is counted at aten level:
re-traced with ``make_fx`` (pre-dispatch, which keeps ``aten.linear``) on the block's recorded inputs, the same
level the captured graph is at. Each test also checks the rewritten graph computes what the block did.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx
from transformers import AutoModelForCausalLM

from gqla_compile.capture import capture_attention_candidates, recorded_inputs
from gqla_compile.passes.context import LayerContext
from gqla_compile.passes.detect import DetectLatentAttention
from gqla_compile.passes.manager import PassManager
from gqla_compile.passes.shard import ShardAttention, TensorParallelLayout
from gqla_compile.passes.split import SplitLatentProjection
from gqla_compile.paths import PATHS
from gqla_compile.tiny import tiny_deepseek_v3

from _models import randomize_biases_and_norms

aten = torch.ops.aten
LINEAR, SDPA, CAT = aten.linear.default, aten.scaled_dot_product_attention.default, aten.cat.default
MATMULS = (aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default)


def count_ops(gm: fx.GraphModule, inputs: list | None = None) -> Counter:
    """The graph's ``torch.ops.aten`` OpOverloads (``node.target``); with ``inputs``, counted once the graph is
    traced to aten level (without: the graph is at aten level already, as a captured graph is)."""
    if inputs is not None:
        with torch.no_grad():
            gm = make_fx(gm, pre_dispatch=True)(*inputs)
    return Counter(node.target for node in gm.graph.nodes if isinstance(node.target, torch._ops.OpOverload))


def _matmuls(counts: Counter) -> int:
    return sum(counts[op] for op in MATMULS)


@pytest.fixture(scope="module")
def block():
    """The first attention block of a tiny DeepSeek-V3 with random weights: its context after detection, its
    recorded inputs, and its captured graph's OpOverload counts."""
    torch.manual_seed(0)
    model = randomize_biases_and_norms(AutoModelForCausalLM.from_config(tiny_deepseek_v3()).eval())
    capture = capture_attention_candidates(model)[0]
    module = model.get_submodule(capture.module_path)
    context = LayerContext.of(module, capture)
    PassManager().run([DetectLatentAttention(context)], capture.graph_module, capture.module_path)
    assert context.detection.match is not None, context.detection.reason
    inputs = recorded_inputs(capture)
    linears = sum(isinstance(m, nn.Linear) for m in module.modules())
    return context, inputs, count_ops(capture.graph_module), linears


@pytest.fixture(scope="module")
def split(block):
    context, inputs, _, _ = block
    split_pass = SplitLatentProjection(context)
    return split_pass, split_pass(context.capture.graph_module)


def _built(context: LayerContext, path: str, **kwargs):
    match = context.match
    o_weight = context.parameters[match.weight_name(context.capture, match.output_projection)]
    return PATHS[path].build(match.up_projections, o_weight, None, match.scaling, match.dims, **kwargs)


def test_the_captured_block_runs_every_linear_and_one_attention(block):
    _, _, captured, linears = block
    assert captured[LINEAR] == linears == 4 and captured[SDPA] == 1


def test_split_removes_the_up_projection_the_attention_and_the_output_projection(block, split):
    context, inputs, captured, _ = block
    split_pass, gm = split
    after = count_ops(gm, inputs)
    assert after[LINEAR] == captured[LINEAR] - 2  # kv_b_proj and o_proj: the query and down-projections stay
    assert after[SDPA] == 0 and _matmuls(after) == 0
    assert split_pass.summary().removed == {"up_projection": True, "attention": True, "output_projection": True}
    query, latent, rope_key = gm(*inputs)
    dims = context.match.dims
    assert query.shape[1] == dims.n_h and query.shape[-1] == dims.d_n + dims.d_R
    assert latent.shape[-1] == dims.d_c and rope_key.shape[-1] == dims.d_R


def test_expand_adds_one_linear_on_the_new_tokens_latents(block, split):
    context, inputs, _, _ = block
    _, gm = split
    expand = _built(context, "grouped").tail
    before, after = count_ops(gm, inputs), count_ops(expand(gm), inputs)
    # W_UK and W_UV folded (fold.stack_group_up_projections) into one weight: one linear, no per-group matmul
    assert after[LINEAR] == before[LINEAR] + 1 and _matmuls(after) == _matmuls(before) == 0
    assert after[CAT] == before[CAT] + 1  # each group's key: [k_n ; k_R]
    dims = context.match.dims
    w_ukv = next(iter(expand.summary().folded().values()))
    assert w_ukv == [dims.n_g * (dims.d_n + dims.d_v), dims.d_c]


def test_absorb_adds_no_matmul_to_the_projection(block, split):
    context, inputs, _, _ = block
    _, gm = split
    absorb = _built(context, "absorbed").tail
    before, after = count_ops(gm, inputs), count_ops(absorb(gm), inputs)
    # the cache entry [c ; k_R] is one concatenation; W_UK is applied to the query in the core, not here
    assert after[LINEAR] == before[LINEAR] and _matmuls(after) == 0
    assert after[CAT] == before[CAT] + 1
    _, key, value = absorb(gm)(*inputs)
    dims = context.match.dims
    assert key.shape[1] == 1 and key.shape[-1] == dims.d_c + dims.d_R and value.shape[-1] == 0


def _core_ops(context: LayerContext, core: nn.Module, path: str) -> Counter:
    """OpOverloads of the attention core at one decode step (one query over 16 cached tokens)."""
    dims, decode_path = context.match.dims, PATHS[path]
    key_shape, value_shape = decode_path.cache_shapes(dims, 1, 16)
    query = torch.randn(1, dims.n_h, 1, decode_path.core_query_dims(dims))
    return count_ops(core, [query, torch.randn(key_shape), torch.randn(value_shape), None])


def test_folding_the_value_up_projection_into_o_proj_removes_a_matmul_from_the_core(block):
    context, _, _, _ = block
    per_group = _core_ops(context, _built(context, "absorbed", output_absorption="bmm").core, "absorbed")
    folded = _core_ops(context, _built(context, "absorbed", output_absorption="folded").core, "absorbed")
    assert _matmuls(folded) == _matmuls(per_group) - 1  # W_UV^g after attention, now inside W_O~
    assert folded[aten.softmax.int] == per_group[aten.softmax.int] == 1 and folded[SDPA] == 0


def test_shard_slices_the_query_projection_without_adding_an_op(block, split):
    context, inputs, _, _ = block
    _, gm = split
    dims = context.match.dims
    shard = ShardAttention(TensorParallelLayout(PATHS["absorbed"], dims, tp=2, rank=1), context.capture)
    sharded = shard(gm)
    assert shard.summary().query_projection == "rows of the rank's heads"
    assert count_ops(sharded, inputs) == count_ops(gm, inputs)
    with torch.no_grad():
        expected, got = gm(*inputs), sharded(*inputs)
    heads = dims.n_h // 2
    torch.testing.assert_close(got[0], expected[0][:, heads:], rtol=1e-5, atol=1e-6)
