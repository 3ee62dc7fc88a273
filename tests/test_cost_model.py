"""The cost model: the paper's two decisions, the choice table's invariants, the figures and the errors."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from gqla_compile import kv_cache_elements, targets
from gqla_compile.cost_model import PATHS, choice_table, plan, reference_configs
from gqla_compile.errors import NoLatentAttentionError
from gqla_compile.targets import BUILTINS, Target
from gqla_compile.tiny import tiny_deepseek_v3, tiny_llama

DOC = Path(__file__).resolve().parents[1] / "docs" / "cost_model.md"
CONFIGS = reference_configs()
DSV3 = CONFIGS["DeepSeek-V3-shaped"]
LLAMA_GQLA = CONFIGS["LLaMA-3-8B-TransGQLA"]


def test_deepseek_v3_shape_picks_absorbed_on_h100_at_s_q_1():
    p = plan(DSV3, "h100", s_q=1)
    assert p.path == "absorbed", p.explain()
    assert p.costs["absorbed"].part("attention_core").bound == "memory"


def test_deepseek_v3_shape_picks_grouped_on_h20_at_s_q_2():
    p = plan(DSV3, "h20", s_q=2)
    assert p.path == "grouped", p.explain()
    core = p.costs["absorbed"].part("attention_core")
    assert core.bound == "compute" and core.arithmetic_intensity > p.ridge
    assert re.match(r"grouped wins on h20 at s_q=2.*AI \d+ > ridge 37.*x faster", p.reason)


@pytest.mark.parametrize("target, s_q, expected", [("h100", 1, "absorbed"), ("h20", 2, "grouped")])
def test_paper_points_hold_at_batch_32(target, s_q, expected):
    assert plan(DSV3, target, s_q=s_q, batch_size=32).path == expected


def test_llama_3_8b_after_transgqla_caches_28_percent():
    llama = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    assert kv_cache_elements(llama, "original") == 2048
    assert kv_cache_elements(LLAMA_GQLA, "absorbed") == 576
    assert kv_cache_elements(LLAMA_GQLA, "absorbed") / kv_cache_elements(llama, "original") == 0.28125


def _choices():
    """(shape, target, batch) -> the chosen path for s_q = 1, 2, 4."""
    return {
        (shape, chip.name, batch): [plan(config, chip, s_q=s, batch_size=batch).path for s in (1, 2, 4)]
        for shape, config in CONFIGS.items() for chip in BUILTINS for batch in (1, 32)
    }


def test_choice_table_invariants():
    choices = _choices()
    assert choices["DeepSeek-V3-shaped", "h100", 1][0] == "absorbed"
    assert choices["DeepSeek-V3-shaped", "h20", 1][1] == "grouped"
    for key, paths in choices.items():  # more tokens per step never brings absorbed back
        assert paths == sorted(paths), key  # "absorbed" < "grouped"


def test_committed_doc_holds_the_generated_table():
    text = DOC.read_text()
    table = text.split("<!-- choice-table:begin -->\n", 1)[1].split("\n<!-- choice-table:end -->", 1)[0]
    assert table == choice_table(), (
        "docs/cost_model.md is stale: paste the output of "
        "`python -c 'from gqla_compile.cost_model import choice_table; print(choice_table())'`")


def test_parts_follow_the_design_table():
    p = plan(DSV3, "h100", s_q=2, batch_size=3, context_len=100, rope_key="copied")
    absorbed, grouped = p.costs["absorbed"], p.costs["grouped"]
    core = absorbed.part("attention_core")
    assert core.bytes == 3 * 100 * (512 + 64) * 2
    assert core.flops == 3 * 100 * 2 * 128 * 2 * (512 + 64 + 512)
    core = grouped.part("attention_core")
    assert core.bytes == 3 * 100 * 8 * (128 + 64 + 128) * 2
    assert core.flops == 3 * 100 * 2 * 128 * 2 * (128 + 64 + 128)
    assert absorbed.part("cache_write").bytes == 3 * 2 * 576 * 2
    assert grouped.cache_bytes_per_token == 8 * 320 * 2
    for cost in p.costs.values():
        assert cost.part("all_reduce").time_s == 0
        assert cost.time_s == pytest.approx(sum(part.time_s for part in cost.parts))
        assert cost.step_time_s == pytest.approx(61 * cost.time_s)
        for part in cost.parts:
            assert part.time_s == pytest.approx(max(part.bytes / 3.35e12, part.flops / 989.4e12))
    assert len(p.layers) == 61 and {layer.path for layer in p.layers} == {p.path}


def test_absorbed_path_prefers_bmm_over_bigger_folded_weights():
    p = plan(DSV3, "h100")
    assert p.output_absorption == "bmm" and not hasattr(p, "query_absorption")  # W_UK is always a bmm
    projections = p.costs["absorbed"].part("projections")
    q_a, q_b, kv_a, o_proj = 1536 * 7168, 128 * 192 * 1536, 576 * 7168, 7168 * 128 * 128
    w_uk = w_uv = 8 * 128 * 512
    assert projections.bytes == 2 * (q_a + q_b + kv_a + o_proj + w_uk + w_uv)
    kv_b = 8 * 256 * 512
    assert p.costs["grouped"].part("projections").bytes == 2 * (q_a + q_b + kv_a + o_proj + kv_b)


def test_folding_wins_when_the_latent_is_smaller_than_the_heads():
    small_latent = copy.deepcopy(DSV3)
    small_latent.kv_lora_rank, small_latent.q_lora_rank = 32, None
    assert plan(small_latent, "h100").output_absorption == "folded"
    # a block with a per-channel output gate needs the heads' d_v values apart: optimize forces the bmm
    forced = plan(small_latent, "h100", output_absorption="bmm")
    assert forced.output_absorption == "bmm"
    assert forced.costs["absorbed"].part("projections").bytes > plan(small_latent, "h100").costs["absorbed"].part(
        "projections").bytes
    with pytest.raises(ValueError, match="output_absorption"):
        plan(small_latent, "h100", output_absorption="fused")


def test_tensor_parallel_shards_groups_and_replicates_the_latent():
    one, four = (plan(DSV3, "h20", s_q=2, batch_size=8, tp=tp, rope_key="copied") for tp in (1, 4))
    grouped_core = [p.costs["grouped"].part("attention_core").bytes for p in (one, four)]
    absorbed_core = [p.costs["absorbed"].part("attention_core") for p in (one, four)]
    assert grouped_core[1] == grouped_core[0] / 4
    assert absorbed_core[1].bytes == absorbed_core[0].bytes and absorbed_core[1].flops == absorbed_core[0].flops / 4
    assert four.costs["grouped"].cache_bytes_per_token_per_rank == 2 * 2 * 320
    reduce = four.costs["grouped"].part("all_reduce")
    assert reduce.bytes == 2 * 3 / 4 * 8 * 2 * 7168 * 2 and reduce.bound == "interconnect"
    assert reduce.time_s == pytest.approx(reduce.bytes / 450e9)


def test_tp_that_does_not_divide_groups():
    with pytest.raises(ValueError, match="tp=16 does not divide the 8 latent groups"):
        plan(DSV3, "h100", tp=16, path="grouped")
    p = plan(DSV3, "h100", tp=16)  # absorbed shards 128 heads: still feasible
    assert p.path == "absorbed" and list(p.costs) == ["absorbed"] and "only path" in p.reason
    with pytest.raises(ValueError, match="query heads"):
        plan(DSV3, "h100", tp=3)


def test_forced_path_keeps_both_costs():
    p = plan(DSV3, "h100", path="grouped")
    assert p.path == "grouped" and set(p.costs) == set(PATHS)
    assert p.reason.startswith("path forced to grouped; the cost model would pick absorbed")


def test_shared_rope_key_reads_fewer_bytes():
    copied, shared = (plan(DSV3, "h20", s_q=2, rope_key=k).costs["grouped"] for k in ("copied", "shared"))
    assert shared.cache_bytes_per_token == (8 * 256 + 64) * 2 < copied.cache_bytes_per_token
    assert shared.part("attention_core").bytes < copied.part("attention_core").bytes


def test_measured_kernel_efficiency_slows_its_parts():
    """A target's measured efficiency divides the roofline time of the part its kernel runs: the attention
    core by query rows per cached head (absorbed: n_h x s_q; grouped: n_h / n_g x s_q; one new token and
    several are kernels of their own), the projections by new tokens."""
    chip = targets.get("h20")
    measured = Target("measured-h20", chip.peak_flops, memory_bandwidth=chip.memory_bandwidth,
                      memory_capacity=chip.memory_capacity, interconnect_bandwidth=chip.interconnect_bandwidth,
                      kernels={targets.KERNEL_GEMV: targets.KernelEfficiency((1, 64), (0.5, 0.5)),
                               "attention_absorbed": targets.KernelEfficiency((1, 1024), (0.25, 0.25)),
                               "attention_absorbed_multi_token": targets.KernelEfficiency((2, 1024), (0.3, 0.3)),
                               "attention_grouped": targets.KernelEfficiency((1, 16), (0.05, 0.1)),
                               "attention_grouped_multi_token": targets.KernelEfficiency((2, 16, 32),
                                                                                         (0.05, 0.1, 0.2))})
    # grouped: 16 rows per group at s_q 1; 32 at s_q 2 (the last measured), 64 at s_q 4 (beyond: the last holds)
    for s_q, absorbed_efficiency, grouped_efficiency in ((1, 0.25, 0.1), (2, 0.3, 0.2), (4, 0.3, 0.2)):
        base, slow = (plan(DSV3, t, s_q=s_q, rope_key="copied") for t in (chip, measured))
        for path, efficiency in (("absorbed", absorbed_efficiency), ("grouped", grouped_efficiency)):
            core, slow_core = base.costs[path].part("attention_core"), slow.costs[path].part("attention_core")
            assert slow_core.efficiency == pytest.approx(efficiency)
            assert slow_core.time_s == pytest.approx(core.time_s / efficiency)
            assert slow.costs[path].part("projections").time_s == pytest.approx(
                base.costs[path].part("projections").time_s / 0.5)
    assert "kernel efficiency" in slow.explain()


def test_auto_rope_key_takes_the_faster_layout():
    # bandwidth-bound grouped core: keeping k_R once reads fewer bytes, so the plan takes it
    assert plan(DSV3, "h100", batch_size=32, context_len=8192).rope_key == "shared"
    # tp that cannot shard the groups leaves no grouped path: nothing to choose
    assert plan(DSV3, "h100", tp=16).rope_key == "copied"


def test_dtype_default_and_fallback(caplog):
    assert plan(DSV3, "h100").dtype == "bfloat16"
    model_config = tiny_deepseek_v3()
    assert plan(model_config, "h100", dtype=torch.float32).peak_flops == pytest.approx(66.9e12)
    assert plan(model_config, "h100", dtype="float16").dtype == "float16"
    assert plan(DSV3, "a100", dtype="float8").peak_flops == pytest.approx(312e12) and "no float8 figure" in caplog.text


def test_plan_from_a_model_uses_its_dtype():
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(tiny_deepseek_v3())
    p = plan(model, "h100")
    assert p.dtype == "float32" and p.dims.n_g == p.dims.n_h == 4 and p.num_layers == 2


def test_custom_target_and_measured_cpu():
    chip = Target("slow-chip", {"bfloat16": 10e12}, memory_bandwidth=1e12, memory_capacity=1e10,
                  interconnect_bandwidth=1e10)
    assert plan(DSV3, chip, s_q=4, batch_size=32).target is chip
    cpu = targets.measure_cpu()
    assert plan(tiny_deepseek_v3(), "cpu").target is cpu


def test_explain_and_to_dict():
    p = plan(DSV3, "h20", s_q=2, tp=2)
    text = p.explain()
    for word in ("attention_core", "cache_write", "projections", "all_reduce", "total / layer", "ridge", "grouped *",
                 p.reason):
        assert word in text
    data = json.loads(json.dumps(p.to_dict()))
    assert data["path"] == "grouped" and data["inputs"]["tp"] == 2 and data["dims"]["n_g"] == 8
    assert data["paths"]["absorbed"]["parts"][0]["name"] == "attention_core"
    assert len(data["layers"]) == 61


@pytest.mark.parametrize("kwargs, name", [
    ({"s_q": 0}, "s_q"), ({"batch_size": 0}, "batch_size"), ({"context_len": 0}, "context_len"), ({"tp": 0}, "tp"),
    ({"path": "mqa"}, "path"), ({"rope_key": "once"}, "rope_key"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        plan(DSV3, "h100", **kwargs)


def test_model_without_latent_attention():
    with pytest.raises(NoLatentAttentionError, match="convert"):
        plan(tiny_llama(), "h100")
    from transformers import LlamaForCausalLM

    with pytest.raises(NoLatentAttentionError, match="llama"):
        plan(LlamaForCausalLM(tiny_llama()), "h100")
