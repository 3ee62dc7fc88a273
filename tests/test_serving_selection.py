"""The vLLM plugin's path choice (gqla_compile.serving.selection), which needs no vLLM: requested path,
forced-path and tp errors, the cost model's choice with the served (padded) sizes."""

import sys

import pytest

from gqla_compile import GqlaConfig
from gqla_compile.serving.selection import (
    EngineShape,
    GqlaServingError,
    choose_path,
    is_regrouped,
    requested_path,
    serves_gqla,
)

ENGINE = EngineShape(tp=1, max_num_seqs=8, tokens_per_step=1, max_model_len=4096, dtype="float32")
DEEPSEEK_LIKE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, kv_lora_rank=512,
                     qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=4, vocab_size=1000)


def test_package_import_does_not_import_vllm():
    import gqla_compile.serving  # noqa: F401

    assert "vllm" not in sys.modules


def test_requested_path_sources(monkeypatch):
    config = GqlaConfig(**DEEPSEEK_LIKE)
    monkeypatch.delenv("GQLA_PATH", raising=False)
    assert requested_path(config) == ("auto", "default")
    monkeypatch.setenv("GQLA_PATH", "Grouped")
    assert requested_path(config) == ("grouped", "$GQLA_PATH")
    config.gqla_path = "absorbed"  # what hf_overrides={"gqla_path": ...} does; it wins over the environment
    assert requested_path(config)[0] == "absorbed"
    config.gqla_path = "fastest"
    with pytest.raises(GqlaServingError, match="'fastest' is not a GQLA decoding path; use one of 'auto', "
                                               "'absorbed', 'grouped'"):
        requested_path(config)


def test_forced_path_that_tp_cannot_shard_names_the_fix(monkeypatch):
    monkeypatch.delenv("GQLA_PATH", raising=False)
    config = GqlaConfig(**{**DEEPSEEK_LIKE, "num_key_value_heads": 2})
    config.gqla_path = "grouped"
    engine = EngineShape(tp=4, max_num_seqs=1, tokens_per_step=1, max_model_len=1024, dtype="float32")
    with pytest.raises(GqlaServingError, match=r"tp=4 does not divide the 2 .*serve the absorbed path"):
        choose_path(config, engine, {})
    config.gqla_path = "absorbed"  # the latent is replicated: any tp dividing the heads serves it
    assert choose_path(config, engine, {}).path == "absorbed"


def test_backend_problem_makes_the_other_path_the_only_one(monkeypatch):
    monkeypatch.delenv("GQLA_PATH", raising=False)
    config = GqlaConfig(**DEEPSEEK_LIKE)
    choice = choose_path(config, ENGINE, {"absorbed": "the MLA backend takes only 576"})
    assert choice.path == "grouped" and "only servable path" in choice.reason and "576" in choice.reason
    config.gqla_path = "absorbed"
    with pytest.raises(GqlaServingError, match="takes only 576.*serve the grouped path"):
        choose_path(config, ENGINE, {"absorbed": "the MLA backend takes only 576"})


def test_auto_prices_the_served_sizes(monkeypatch):
    """A latent padded ninefold makes the absorbed path read ninefold: the choice must see that."""
    monkeypatch.delenv("GQLA_PATH", raising=False)
    small = GqlaConfig(**{**DEEPSEEK_LIKE, "kv_lora_rank": 48, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32,
                          "v_head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128})
    engine = EngineShape(tp=1, max_num_seqs=4, tokens_per_step=1, max_model_len=256, dtype="float32", target="h100")
    unpadded = choose_path(small, engine, {})
    padded = choose_path(small, engine, {}, {"absorbed": {"kv_lora_rank": 512, "qk_rope_head_dim": 64}})
    assert "cost model on target h100" in padded.reason
    assert (unpadded.path, padded.path) == ("absorbed", "grouped")


def test_which_configs_the_plugin_serves():
    from transformers import DeepseekV3Config

    assert serves_gqla(GqlaConfig(**DEEPSEEK_LIKE))
    stock = DeepseekV3Config(num_attention_heads=4, num_key_value_heads=4)
    assert not is_regrouped(stock) and not serves_gqla(stock)
    stock.gqla_conversion = {"num_groups": 2}
    assert is_regrouped(stock)
    stock.gqla_conversion = {"num_groups": 4}  # regrouped into as many groups as heads: plain MLA
    assert not is_regrouped(stock)


def test_backend_costs_price_the_engine_kernels(monkeypatch):
    """A measured backend point becomes that path's attention efficiency against the planned target (roofline
    time over measured time); a grouped kernel's padded heads divide it; other platforms keep the target's;
    and the measured CPU backends make a slow MLA kernel turn the choice to the grouped path."""
    from gqla_compile import targets
    from gqla_compile.serving.backend_costs import engine_target, load_table
    from gqla_compile.paths import PATHS

    def attention_kernel(path, multi_token=False):
        return PATHS[path].attention_kernel(multi_token=multi_token)

    monkeypatch.delenv("GQLA_PATH", raising=False)
    chip = targets.get("h100")
    slow_mla = [{"rows": 16, "bytes": 1e9, "flops": 1e9, "seconds": 1e9 / chip.memory_bandwidth * 20}]
    table = {"platform": "cpu", "backends": {"MLA": slow_mla}, "provenance": {
        "command": "measure", "vllm": "x", "date": "today", "dtype": "float32"}}
    backends = {"absorbed": "MLA", "grouped": "GQA"}
    priced, note = engine_target(chip, "cpu", backends, {"grouped": 1.5}, table=table)
    assert priced.efficiency(attention_kernel("absorbed"), 16) == pytest.approx(1 / 20)
    assert priced.efficiency(attention_kernel("grouped"), 4) == pytest.approx(1 / 1.5)
    assert priced.efficiency(attention_kernel("grouped", multi_token=True), 8) == pytest.approx(1 / 1.5)
    assert attention_kernel("absorbed", multi_token=True) not in priced.kernels  # not measured: the target's
    assert note.startswith("attention priced as vLLM's measured absorbed: MLA (measure, vLLM x, today)")
    elsewhere, note = engine_target(chip, "cuda", backends, table=table)
    assert elsewhere.kernels == chip.kernels and "no measured cost" in note

    config = GqlaConfig(**DEEPSEEK_LIKE)
    at = dict(tp=1, max_num_seqs=1, tokens_per_step=1, max_model_len=4096, dtype="float32")
    assert choose_path(config, EngineShape(**at, target=chip), {}).path == "absorbed"
    assert choose_path(config, EngineShape(**at, target=priced), {}).path == "grouped"

    committed = load_table()  # the measured table shipped with the package
    assert committed["platform"] == "cpu" and {"CPU_MLA", "CPU_ATTN"} <= set(committed["backends"])
    assert all(p["seconds"] > 0 and p["bytes"] > 0 for points in committed["backends"].values() for p in points)
