"""Tensor parallel on CPU (gloo): each rank holds only its shard, and together they decode exactly what
one process does.

Every case runs in processes spawned by ``gqla_compile.distributed.run_parallel`` (bounded in time; a
failing rank ends the run with an error naming it). Eager (compile=False) float32; the reference is the
unmodified model in the same process.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import (
    LAYOUTS,
    cache_elements,
    expected_cache_elements,
    randomize_biases_and_norms,
    relative_error,
    teacher_forced_decode,
)
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.cache_sizes import latent_cache_elements
from gqla_compile.dims import LatentDims
from gqla_compile.distributed import run_parallel
from gqla_compile.errors import GqlaError
from gqla_compile.paths import PATHS
from gqla_compile.tiny import tiny_deepseek_v3, tiny_gqla

PROMPT, DECODE_STEPS, NEW_TOKENS, BATCH = 6, 8, 8, 2
TIMEOUT = 150

MODELS = {
    "gqla": dict(factory=tiny_gqla, num_attention_heads=8, num_key_value_heads=4, attention_output_bias=True),
    "deepseek_v3": dict(factory=tiny_deepseek_v3),
}


def build(name: str):
    spec = dict(MODELS[name])
    factory = spec.pop("factory")
    torch.manual_seed(0)  # the same weights on every rank
    model = AutoModelForCausalLM.from_config(factory(**spec), attn_implementation="sdpa").eval()
    return randomize_biases_and_norms(model)


def _equivalence(rank: int, world_size: int, cases, compile: bool = False) -> dict:
    """Run on every rank: optimize with tp=world_size, decode, compare against the unmodified model."""
    results = {}
    for name, path, rope_key in cases:
        reference = build(name)
        optimized = gqla_compile.optimize(copy.deepcopy(reference), path=path, target="h100", tp=world_size,
                                          rope_key=rope_key, compile=compile)
        state = optimized.gqla_optimization
        vocab = reference.config.vocab_size
        tokens = torch.randint(0, vocab, (BATCH, PROMPT + DECODE_STEPS), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = teacher_forced_decode(reference, tokens, PROMPT)
            actual = teacher_forced_decode(optimized, tokens, PROMPT)
        kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
        prompt = tokens[:, :PROMPT]
        generated = optimized.generate(prompt, **kwargs)
        reference_tokens = reference.generate(prompt, **kwargs).sequences
        shard_record = next(r for r in state.layers[0].records if r.pass_name == "shard")
        report = gqla_compile.report(optimized).data
        results[(name, path, rope_key)] = dict(
            rope_key=state.plan.rope_key,
            errors=[relative_error(a, e) for a, e in zip(actual, expected)],
            tokens_equal=torch.equal(generated.sequences, reference_tokens),
            cache_elements=cache_elements(generated.cache),
            cached_tokens=PROMPT + NEW_TOKENS - 1,
            dims=state.layers[0].dims,
            per_rank=state.layers[0].cache_elements_per_rank,
            layers=len(state.layers),
            tp=(state.tp, state.rank),
            sharding=dict(state.tp_sharding),
            shard_summary=shard_record.summary,
            pass_names=[r.pass_name for r in state.layers[0].records],
            graph_breaks=state.compile.graph_breaks if compile else 0,
            report_parallel=report["tensor_parallel"],
            report_bytes_per_rank=report["layers"][0]["cache"]["bytes_per_rank"],
        )
    return results


ALL_CASES = [(name, path, rope_key) for name in MODELS for path, rope_key in LAYOUTS]
RUNS = [
    pytest.param((2, ALL_CASES, False), id="tp2"),
    # tp=4 covers each model and each layout here; the other combinations run with -m slow. Both on one worker
    # (xdist_group), where one launch of 4 processes runs the cases of both (_launch).
    pytest.param((4, [("gqla", "grouped", "copied"), ("deepseek_v3", "grouped", "shared"),
                      ("deepseek_v3", "absorbed", "copied")], False), id="tp4", marks=pytest.mark.xdist_group("tp4")),
    pytest.param((4, [("gqla", "absorbed", "copied"), ("deepseek_v3", "grouped", "copied"),
                      ("gqla", "grouped", "shared")], False), id="tp4-rest",
                 marks=[pytest.mark.slow, pytest.mark.xdist_group("tp4")]),
    pytest.param((2, [("gqla", "grouped", "shared"), ("deepseek_v3", "absorbed", "copied")], True),
                 id="tp2-inductor", marks=pytest.mark.slow),
]

_LAUNCHES: dict[tuple, list[dict]] = {}


def _launch(session, world_size: int, compile: bool) -> list[dict]:
    """Each rank's results for every case of the runs with this world size and mode that this session selected,
    from one launch of ``world_size`` processes per pytest process (a launch costs each rank a Python start and
    its own traces)."""
    params = (getattr(getattr(item, "callspec", None), "params", {}).get("parallel_results") for item in session.items)
    runs = {repr(p): p for p in params if p is not None and (p[0], p[2]) == (world_size, compile)}.values()
    cases = list(dict.fromkeys(case for _, run_cases, _ in runs for case in run_cases))
    key = (world_size, compile, tuple(cases))
    if key not in _LAUNCHES:
        timeout = TIMEOUT * len(runs) if not compile else 900
        _LAUNCHES[key] = run_parallel(_equivalence, world_size, cases, compile, timeout=timeout)
    return _LAUNCHES[key]


@pytest.fixture(scope="module", params=RUNS)
def parallel_results(request):
    world_size, cases, compile = request.param
    per_rank = _launch(request.session, world_size, compile)
    return world_size, [{case: results[case] for case in cases} for results in per_rank]


def test_sharded_decode_matches_single_process(parallel_results):
    world_size, per_rank = parallel_results
    for rank, results in enumerate(per_rank):
        for (name, path, rope_key), result in results.items():
            where = f"{name}, {path} path, RoPE key {rope_key}, rank {rank} of {world_size}"
            assert result["tp"] == (world_size, rank) and result["rope_key"] == rope_key
            assert max(result["errors"]) < 1e-4, f"{where}: relative errors {result['errors']}"
            assert result["tokens_equal"], f"{where}: greedy tokens differ"
            tail = "absorb" if path == "absorbed" else "expand"
            assert result["pass_names"] == ["detect", "split", "shard", tail], where
            assert result["graph_breaks"] == 0, where  # Inductor sees the functional all-reduce


def test_each_rank_caches_its_share(parallel_results):
    world_size, per_rank = parallel_results
    for rank, results in enumerate(per_rank):
        for (name, path, rope_key), result in results.items():
            where = f"{name}, {path} path, RoPE key {rope_key}, rank {rank} of {world_size}"
            dims: LatentDims = result["dims"]
            per_rank = expected_cache_elements(dims, path, rope_key, world_size)
            assert result["per_rank"] == per_rank, where
            assert result["cache_elements"] == result["layers"] * BATCH * result["cached_tokens"] * per_rank, where
            summary = result["shard_summary"]
            if path == "grouped":  # keys and values of n_g / P groups (and k_R, once, when shared)
                assert summary.groups == [rank * dims.n_g // world_size, (rank + 1) * dims.n_g // world_size]
            if (path, rope_key) == ("grouped", "copied"):  # nothing replicated: the ranks split the cache
                assert per_rank * world_size == latent_cache_elements(dims, path), where
            assert summary.heads == [rank * dims.n_h // world_size, (rank + 1) * dims.n_h // world_size], where
            assert summary.query_projection == "rows of the rank's heads", where
            assert result["sharding"]["mlp"] == "replicated"
            assert result["report_parallel"]["tp"] == world_size and result["report_parallel"]["rank"] == rank
            assert result["report_bytes_per_rank"] == result["per_rank"] * 4, where  # float32


def test_shard_record_counts_the_ranks_cache_in_the_plans_layout(parallel_results):
    """The shard pass's record states the per-rank cache of the RoPE-key layout the plan took (the shared
    layout keeps k_R once on every rank), the figure LayerRewrite holds."""
    world_size, per_rank = parallel_results
    layouts = set()
    for rank, results in enumerate(per_rank):
        for (name, path, rope_key), result in results.items():
            summary = result["shard_summary"]
            assert summary.path == path and result["rope_key"] == rope_key
            assert summary.cache_elements_per_token_per_rank == result["per_rank"], (name, path, rope_key, rank)
            layouts.add((path, rope_key))
    if world_size == 2 and len(per_rank[0]) == len(ALL_CASES):
        assert {("grouped", "copied"), ("grouped", "shared")} <= layouts


#: Families with the optional pieces, on the path that exercises them: sparse attention (DeepSeek-V3.2; GLM-5,
#: whose "shared" layers read the previous layer's selection), learned sinks with a per-channel gate and DSA
#: (Hunyuan V4, both paths) and a per-head gate (Bailing hybrid).
OPTIONAL_PIECES = [("deepseek_v32", "absorbed"), ("glm_moe_dsa", "grouped"), ("hy_v4", "absorbed"),
                   ("hy_v4", "grouped"), ("bailing_hybrid", "grouped")]


def _family_decode(rank: int, world_size: int, cases) -> dict:
    """Run on every rank: the family's greedy decode (test_families' models and prompts) with tp=world_size."""
    from test_families import _greedy, _model, _reference

    results = {}
    for name, path in cases:
        prompt, expected_tokens, expected_steps = _reference(name)
        optimized = gqla_compile.optimize(copy.deepcopy(_model(name)), path=path, target="h20", tp=world_size,
                                          compile=False)
        tokens, steps, _ = _greedy(optimized, prompt)
        layer = optimized.gqla_optimization.layers[0]
        results[(name, path)] = dict(
            tokens_equal=tokens == expected_tokens,
            errors=[relative_error(got, want) for got, want in zip(steps, expected_steps)],
            heads=next(r for r in layer.records if r.pass_name == "shard").summary.heads,
            n_h=layer.dims.n_h,
        )
    return results


def test_sparse_gated_and_sink_blocks_shard_and_decode_like_one_process():
    """Each rank keeps its heads' queries, output gate values and sinks; the token selection's inputs stay whole,
    so every rank selects the same tokens for its own heads."""
    per_rank = run_parallel(_family_decode, 2, OPTIONAL_PIECES, timeout=2 * TIMEOUT)
    for rank, results in enumerate(per_rank):
        assert set(results) == set(OPTIONAL_PIECES)
        for (name, path), result in results.items():
            where = f"{name}, {path} path, rank {rank} of 2"
            assert result["tokens_equal"] and max(result["errors"]) < 1e-4, (where, result["errors"])
            n_h = result["n_h"]
            assert result["heads"] == [rank * n_h // 2, (rank + 1) * n_h // 2], where


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("no weights for this rank")


def _wait_forever(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank 1 gave up")
    dist.barrier()  # rank 0 would block here for ever without the launcher's watch


def test_a_rank_failing_at_start_up_ends_the_run():
    with pytest.raises(RuntimeError, match=r"rank 1 failed during start-up: ValueError: no weights for this rank"):
        run_parallel(_wait_forever, 2, setup=_fail_on_rank_one, timeout=60)


def test_a_rank_failing_while_others_wait_ends_the_run():
    with pytest.raises(RuntimeError, match=r"rank 1 failed while running: ValueError: rank 1 gave up"):
        run_parallel(_wait_forever, 2, timeout=60)


def test_tp_needs_a_process_group():
    with pytest.raises(GqlaError, match="process group"):
        gqla_compile.optimize(build("gqla"), path="grouped", tp=2, compile=False)


def test_tp_not_dividing_the_groups_is_refused_before_any_work():
    with pytest.raises(ValueError, match="tp=3 does not divide the 4 latent groups"):
        gqla_compile.optimize(build("gqla"), path="grouped", tp=3, compile=False)
    with pytest.raises(ValueError, match="tp=3 does not divide the 8 query heads"):
        gqla_compile.optimize(build("gqla"), path="auto", tp=3, compile=False)


def test_layout_splits_groups_heads_and_weights():
    from gqla_compile.passes.shard import TensorParallelLayout

    dims = LatentDims(n_h=8, n_g=4, d_c=6, d_R=2, d_n=3, d_v=5, hidden_size=16)
    w_uk, w_uv = torch.randn(4, 3, 6), torch.randn(4, 5, 6)
    o_weight = torch.randn(16, 8 * 5)
    layout = TensorParallelLayout(PATHS["grouped"], dims, tp=2, rank=1)
    assert layout.heads == (4, 8) and layout.head_groups == (2, 4, 2)
    key, value = layout.up_projections(w_uk, w_uv)
    assert torch.equal(key, w_uk[2:]) and torch.equal(value, w_uv[2:])
    assert torch.equal(layout.output_columns(o_weight, 5), o_weight[:, 20:])
    assert layout.cache_elements() * 2 == latent_cache_elements(dims, "grouped")
    # absorbed with more ranks than groups: a rank holds one head, with its group's up-projection
    layout = TensorParallelLayout(PATHS["absorbed"], dims, tp=8, rank=3)
    key, value = layout.up_projections(w_uk, w_uv)
    assert layout.local_dims.n_h == 1 and torch.equal(key, w_uk[1:2]) and torch.equal(value, w_uv[1:2])
    assert layout.cache_elements() == latent_cache_elements(dims, "absorbed")
    with pytest.raises(ValueError, match="tp=8 does not divide the 4 latent groups"):
        TensorParallelLayout(PATHS["grouped"], dims, tp=8, rank=0)


def test_shard_pass_keeps_the_ranks_query_heads_only():
    """The pass alone, no process group: the sliced graph's query is the whole graph's heads 4..8."""
    from gqla_compile.capture import capture_attention_candidates, recorded_inputs
    from gqla_compile.passes.context import LayerContext
    from gqla_compile.passes.detect import DetectLatentAttention
    from gqla_compile.passes.manager import PassManager
    from gqla_compile.passes.shard import ShardAttention, TensorParallelLayout
    from gqla_compile.passes.split import SplitLatentProjection

    model = build("gqla")
    capture = capture_attention_candidates(model)[0]
    context = LayerContext.of(model.get_submodule(capture.module_path), capture)
    PassManager().run([DetectLatentAttention(context)], capture.graph_module, capture.module_path)
    whole = SplitLatentProjection(context)(capture.graph_module)
    shard = ShardAttention(TensorParallelLayout(PATHS["grouped"], context.match.dims, tp=2, rank=1), capture)
    sharded = shard(whole)
    inputs = recorded_inputs(capture)
    with torch.no_grad():
        expected, got = whole(*inputs), sharded(*inputs)
    assert torch.allclose(got[0], expected[0][:, 4:8], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(g, e) for g, e in zip(got[1:], expected[1:]))
    q_rows = [tuple(b.shape) for n, b in sharded.named_buffers() if n.startswith("q_proj")]
    assert q_rows == [(4 * 24, 64)]  # only the rank's 4 heads' rows of q_proj remain
    assert shard.summary().query_projection == "rows of the rank's heads"
