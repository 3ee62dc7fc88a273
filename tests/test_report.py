"""The graph-diff report: what it shows for each path, cache bytes against DESIGN.md's table, folding of
identical layers, the JSON round trip, dry runs that leave the model alone, and the HTML in a real browser."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

import gqla_compile
from gqla_compile.reporting import Report, ReportError
from gqla_compile.tiny import tiny_deepseek_v3, tiny_gqla, tiny_llama

aten = torch.ops.aten


def _model(factory, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(factory(**overrides)).eval()


@pytest.fixture(scope="module")
def absorbed_report():
    model = gqla_compile.optimize(_model(tiny_deepseek_v3), target="h100", path="absorbed", compile=False)
    return gqla_compile.report(model)


@pytest.fixture(scope="module")
def grouped_dry_run():
    model = _model(tiny_gqla)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, state, gqla_compile.report(model, target="h20", path="grouped")  # a dry run on a copy


@pytest.fixture(scope="module")
def grouped_report(grouped_dry_run):
    return grouped_dry_run[2]


def _kv_b_shape(dims):
    return [dims["n_g"] * (dims["d_n"] + dims["d_v"]), dims["d_c"]]


def test_absorbed_removes_the_up_projection_matmul(absorbed_report):
    assert absorbed_report.path == "absorbed"
    [row] = absorbed_report.layers
    kv_b = _kv_b_shape(row["dims"])
    before = [m for m in row["matmul_weights_before"] if m["shape"] == kv_b]
    assert [(m["op"], m["weight"]) for m in before] == [("linear", "kv_b_proj.weight")]
    assert not [m for m in row["matmul_weights_after"] if m["shape"] == kv_b]
    # the report names an op by its OpOverloadPacket (tests/test_passes.py counts the OpOverloads per pass)
    linear, softmax, sdpa = (str(op) for op in (aten.linear, aten.softmax, aten.scaled_dot_product_attention))
    assert row["ops_after"].get(linear, 0) < row["ops_before"][linear]
    # the core's attention at one decode step: attention_over_cache's one softmax, no sdpa kernel
    assert row["ops_after"].get(softmax) == 1 and row["ops_before"][sdpa] == 1
    assert sdpa not in row["ops_after"]
    # the query absorption (W_UK per group) shows as a matmul in the attention core at a decode step (the core
    # applies it in the calls that read the latent; the projection graph hands it [q_n ; q_R]), once
    w_uk = [m for m in row["matmul_weights_after"] if m["weight"] == "core.query_up"]
    assert [(m["graph"], m["shape"]) for m in w_uk] == [("core", [4, 16, 32])]
    # the decode step runs the absorbed form; the report says from which length the expanded form takes over
    forms = row["compute_forms"]
    assert [f["name"] for f in forms["forms"]] == ["absorbed", "expanded"]
    assert {c["call"]: c["form"] for c in forms["calls"]}["decode step"] == "absorbed"
    assert {c["call"]: c["form"] for c in forms["calls"]}["prefill"] == "expanded"
    assert all(c["from_new_tokens"] >= 1 for c in forms["crossover"])
    assert "compute form per call: decode step" in str(absorbed_report)


def test_grouped_keeps_the_up_projection_on_new_tokens(grouped_report):
    assert grouped_report.path == "grouped" and grouped_report.data["dry_run"]
    [row] = grouped_report.layers
    kv_b = _kv_b_shape(row["dims"])
    after = [m for m in row["matmul_weights_after"] if m["shape"] == kv_b]
    assert [(m["graph"], m["op"]) for m in after] == [("projection", "linear")]
    assert any(m["shape"] == kv_b and m["graph"] == "captured" for m in row["matmul_weights_before"])


def test_cache_bytes_follow_the_design_table(absorbed_report, grouped_report):
    for rep, path in ((absorbed_report, "absorbed"), (grouped_report, "grouped")):
        [row] = rep.layers
        d, nbytes = row["dims"], rep.data["cache"]["dtype_bytes"]
        assert nbytes == 4  # float32 tiny models
        shared = rep.data["plan"]["rope_key"] == "shared"  # the grouped layout the plan took is reported
        if path == "absorbed":
            expected = d["d_c"] + d["d_R"]
        elif shared:
            expected = d["n_g"] * (d["d_n"] + d["d_v"]) + d["d_R"]
        else:
            expected = d["n_g"] * (d["d_n"] + d["d_R"] + d["d_v"])
        assert row["cache"]["bytes_after"] == expected * nbytes
        assert row["cache"]["bytes_before"] == (d["d_c"] + d["d_R"]) * nbytes
        cache = rep.data["cache"]
        assert cache["bytes_per_token_after"] == 2 * expected * nbytes
        assert cache["bytes_after"] == cache["bytes_per_token_after"] * cache["context_len"] * cache["batch_size"]


def test_diff_names_the_folded_weights(absorbed_report, grouped_report):
    [a], [g] = absorbed_report.layers, grouped_report.layers
    assert set(a["folded_weights"]) == {"w_uk (W_UK^g per group, applied to the query)",
                                        "value_up (W_UV^g per group, after attention)",
                                        "w_ukv (W_UK^g ; W_UV^g stacked per group, expanded form)"}
    assert a["folded_weights"]["w_uk (W_UK^g per group, applied to the query)"] == [4, 16, 32]
    # W_UK is applied in the attention core (a decode step's trace, its weights by position in the diff's code):
    # the text names it through the core's matmul weights
    assert "kv_b_proj" in a["diff"] and "matmul(core.query_up [4, 16, 32])" in str(absorbed_report)
    assert g["folded_weights"] == {"w_ukv (W_UK^g ; W_UV^g stacked per group)": [64, 32]}
    assert "w_ukv" in g["diff"]
    text = str(absorbed_report)
    assert "w_uk" in text and "kv_b_proj.weight [128, 32]" in text


def test_identical_layers_fold_into_one_row(absorbed_report):
    [row] = absorbed_report.layers
    assert row["count"] == 2
    assert row["modules"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert row["attention"] == "sdpa" and row["verification_error"] < 1e-4
    assert "torch.export" in row["traced_by"]


def test_json_round_trip(absorbed_report, grouped_report):
    for rep in (absorbed_report, grouped_report):
        text = rep.to_json()
        again = Report.from_json(text)
        assert again == rep and again.to_json() == text
        assert str(again) == str(rep)


def test_text_and_markdown(absorbed_report):
    text = str(absorbed_report)
    for needle in ("absorbed *", "grouped", "step time", "cache", "not compiled", "skipped: nothing"):
        assert needle in text
    md = absorbed_report.to_markdown()
    assert "| path" in md and "```diff" in md and "<details>" in md


def test_dry_run_leaves_the_model_untouched(grouped_dry_run):
    model, before, rep = grouped_dry_run
    assert rep.has_latent_attention and rep.data["dry_run"]
    assert getattr(model, "gqla_optimization", None) is None
    assert not any(hasattr(m, "gqla_runtime") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unoptimized_without_target_is_a_clear_error():
    with pytest.raises(ReportError, match="target="):
        gqla_compile.report(_model(tiny_gqla))


def test_model_without_latent_attention():
    rep = gqla_compile.report(_model(tiny_llama), target="h100")
    assert not rep.has_latent_attention and rep.layers == []
    assert "no latent attention" in str(rep).lower()
    assert Report.from_json(rep.to_json()) == rep


def test_html_is_self_contained(absorbed_report, tmp_path):
    page = absorbed_report.to_html(tmp_path / "r.html").read_text()
    assert page.count("<svg") == 1 and "<details>" in page
    for external in ("http://", "https://", "<script", "<link"):
        assert external not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_html_renders_in_headless_chromium(absorbed_report, tmp_path):
    """Runs in CI (.ci/run installs chromium); a missing browser is a failure, never a silent skip."""
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed, so the HTML report cannot be checked: apt-get install chromium")
    page = absorbed_report.to_html(tmp_path / "report.html")
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60).stdout
    assert "gqla_compile report" in dom and "Graph diff" in dom and "<table>" in dom
    assert 'id="roofline"' in dom and dom.count('class="point"') == 4  # both paths: core and total
    assert "ridge" in dom and "arithmetic intensity (FLOP/B)" in dom and "absorbed core (chosen)" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   capture_output=True, timeout=60)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
