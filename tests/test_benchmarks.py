"""The benchmark suite in --quick mode (tiny models, small contexts), so that it cannot rot: every part
writes its JSON with the expected keys and sane numbers, the summary is written, and ``gqla-compile bench``
runs end to end. Inductor-compiled variants only in the slow test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import common
from benchmarks.__main__ import PARTS, parse_only, run_suite
from gqla_compile import cli

QUICK_PARTS = ["decode", "cost_model", "sq", "prompt_lookup"]


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    payloads = run_suite(out, quick=True, only=QUICK_PARTS, compile=False, log=lambda *_: None)
    return out, payloads


def _load(out, part):
    return json.loads((out / f"{part}.json").read_text())


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_timing(t):
    assert _positive(t["median"]) and t["min"] <= t["q1"] <= t["median"] <= t["q3"] <= t["max"] and t["n"] >= 2


def test_every_part_writes_json_and_summary(quick_suite):
    out, payloads = quick_suite
    for part in QUICK_PARTS:
        assert "error" not in payloads[part], payloads[part]
        data = _load(out, part)
        assert data["part"] == part and data["quick"] is True
        machine = data["machine"]
        assert machine["cores"] >= 1 and machine["torch"] == torch.__version__ and machine["cpu"]
        assert "load_average" in machine
    summary = (out / "SUMMARY.md").read_text()
    for heading in ("Decode speed", "Cost-model validation", "versus s_q", "Prompt lookup"):
        assert heading in summary
    assert "load average" in summary and "|" in summary


def test_decode_figures(quick_suite):
    data = _load(quick_suite[0], "decode")
    shape = data["shapes"]["gqla"]
    variants = {(r["variant"], r["compiled"]) for r in shape["rows"]}
    assert variants == {("original", False), ("absorbed", False), ("grouped", False)}
    for row in shape["rows"]:
        _check_timing(row["timing"])
        assert _positive(row["tokens_per_s"]) and _positive(row["vs_transformers_eager"])
        assert row["vs_transformers_compiled"] is None  # no compiled baseline without Inductor
        assert row["cache_bytes"] > 0 and _positive(row["roofline_step_s"]) and row["load_average"]
        assert row["vs_roofline"] == pytest.approx(row["step_s"] / row["roofline_step_s"])
    cache = shape["cache"]
    assert cache["absorbed"]["bytes_per_token"] == cache["absorbed"]["measured_bytes_per_token"]
    assert cache["grouped"]["bytes_per_token"] == cache["grouped"]["measured_bytes_per_token"]
    assert data["complete"] is True and set(data["aims"]["gqla"]) >= {"attention_within_1.5x"}
    assert shape["parameters"] > 0


def test_cost_model_figures(quick_suite):
    data = _load(quick_suite[0], "cost_model")
    acc = data["accuracy"]
    assert acc["points"] == len(data["points"]) == 2 * 1 * 2 * 2  # shapes x contexts x batches x s_q
    assert 0.0 <= acc["right_fraction"] <= 1.0
    assert _positive(acc["median_step_predicted_over_measured"])
    assert _positive(acc["median_attention_predicted_over_measured"])
    attention = {"attention_absorbed", "attention_grouped", "attention_grouped_shared"}
    assert _positive(data["target"]["memory_bandwidth"]) and set(data["target"]["kernels"]) == {
        "gemv", *attention, *(f"{name}_multi_token" for name in attention)}
    for point in data["points"]:
        assert point["plan_path"] in ("absorbed", "grouped") and point["measured_faster"] in ("absorbed", "grouped")
        for path in ("absorbed", "grouped"):
            figures = point["paths"][path]
            assert _positive(figures["measured_s"]) and _positive(figures["predicted_attention_s"])
            assert figures["predicted_step_s"] > figures["predicted_attention_s"]
            assert 0 < figures["attention_core_efficiency"] < 10


def test_sq_and_prompt_lookup_figures(quick_suite):
    out = quick_suite[0]
    sq = _load(out, "sq")
    assert {r["s_q"] for r in sq["rows"]} == {1, 2, 4}
    for row in sq["rows"]:
        for variant in ("original", "absorbed", "grouped"):
            assert _positive(row[variant]["step_s"])
        assert _positive(row["grouped_over_absorbed"])
    assert set(sq["crossover_s_q"]) == {"gqla@32", "gqla@64"}
    lookup = _load(out, "prompt_lookup")
    assert lookup["all_identical"] is True
    for entry in lookup["results"].values():
        assert _positive(entry["greedy"]["tokens_per_s"]) and _positive(entry["prompt_lookup"]["tokens_per_s"])
        assert _positive(entry["lookup_speedup"])


def test_timing_and_tables():
    t = common.Timing.of([3.0, 1.0, 2.0, 10.0])
    assert (t.min, t.median, t.max, t.n) == (1.0, 2.5, 10.0, 4) and t.q1 <= t.median <= t.q3
    calls = []
    timing = common.time_call(lambda: calls.append(1), warmup=2, min_repeats=3, max_repeats=3, budget_s=0.0)
    assert timing.n == 3 and len(calls) == 5
    table = common.markdown_table(["a", "b"], [[1.23456, None], ["x", float("nan")]])
    assert "1.23" in table and "-" in table


def test_parse_only():
    assert parse_only(None) == list(PARTS)
    assert parse_only("cache,compile,sq") == ["decode", "sq"]
    with pytest.raises(ValueError, match="unknown part"):
        parse_only("decode,nope")


def test_bench_command_end_to_end(tmp_path, capsys):
    code = cli.main(["bench", "tiny-gqla", "--quick", "--no-compile", "--only", "decode", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    decode = _load(tmp_path, "decode")
    assert list(decode["shapes"]) == ["tiny-gqla"]
    assert (tmp_path / "SUMMARY.md").is_file()


def test_bench_command_usage_errors(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path / "missing"), "--quick", "--out", str(tmp_path)]) == 2
    assert "neither a local model folder" in capsys.readouterr().err  # the one loader's message (checkpoint.py)
    assert cli.main(["bench", "tiny-llama", "--quick", "--out", str(tmp_path)]) == 2  # no latent attention
    assert cli.main(["bench", "tiny-gqla", "--only", "nope", "--out", str(tmp_path)]) == 2


def test_gpu_part_parses_and_refuses_without_cuda(tmp_path, capsys):
    from benchmarks import gpu

    args = gpu.build_parser().parse_args(["--quick", "--out", str(tmp_path), "--compile-mode", "default"])
    assert args.quick and args.compile_mode == "default"
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU part is run by hand, not in the unit tests")
    assert gpu.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_quick_decode_compiled(tmp_path):
    from benchmarks import decode

    data = decode.run(str(tmp_path), quick=True, compile=True, batches=[1])  # one batch size: the compiled graphs
    # are what this test is about, and a second size only recompiles them (the quick suite covers batch 2)
    rows = data["shapes"]["gqla"]["rows"]
    compiled = [r for r in rows if r["compiled"]]
    assert {r["variant"] for r in compiled} == {"original", "absorbed", "grouped"}  # transformers compiled too
    assert all(_positive(r["tokens_per_s"]) for r in compiled)
    for info in data["shapes"]["gqla"]["compile"].values():
        assert info["graphs"] >= 1 and info["graph_breaks"] == 0
    for variant in ("original", "absorbed", "grouped"):  # the first compiled call (dynamo + Inductor) is timed
        assert any(_positive(r["first_call_s"]) for r in compiled if r["variant"] == variant)


def test_summary_from_files(quick_suite):
    from benchmarks.__main__ import summary_from_files

    out = quick_suite[0]
    (out / "SUMMARY.md").unlink()
    path = summary_from_files(out)
    text = path.read_text()
    assert "Decode speed" in text and "Prompt lookup" in text and "Part measured from" in text


def test_quick_dsa(tmp_path):
    """The sparse-attention benchmark in quick mode: every (k, variant) timed, with its parts, and written."""
    from benchmarks import dsa

    data = dsa.run(str(tmp_path), quick=True)
    assert [(r["context"], r["top_k"]) for r in data["rows"]] == dsa.settings(True)["points"]
    for row in data["rows"]:
        for variant in dsa.VARIANTS:
            assert all(_positive(row[variant][k]) for k in ("step_s", "attention_s", "indexer_s"))
    assert json.loads((tmp_path / "dsa.json").read_text())["rows"] == json.loads(json.dumps(data["rows"]))
    assert "speedup vs unmodified" in (tmp_path / "dsa.md").read_text()


def test_quick_request(tmp_path):
    """Whole requests in quick mode (eager, no vLLM): every variant's points with TTFT, decode rate and total, the
    greedy tokens of the rewritten paths equal to the unmodified model's, and each compute form's attention on
    the longest prefill against the measured matmul rate (the plan runs the expanded form there)."""
    from benchmarks import request

    data = request.run(str(tmp_path), quick=True, log=lambda *_: None)
    assert json.loads((tmp_path / "request.json").read_text())["part"] == "request"
    assert "Whole requests" in (tmp_path / "request.md").read_text()
    cfg = data["settings"]
    for name in ("transformers eager", "absorbed", "grouped"):
        points = data["results"][name]["points"]
        assert {(p["batch"], p["prompt"]) for p in points} == {(b, n) for b in cfg["batches"] for n in cfg["prompts"]}
        for point in points:
            for answer in cfg["answers"]:
                figures = point[f"answer_{answer}"]
                assert _positive(figures["ttft_s"]) and _positive(figures["decode_tokens_per_s"])
                assert figures["total_s"] > figures["ttft_s"]
    assert "skipped" in data["results"]["transformers static+compile"]  # quick mode does not compile
    assert data["identical_tokens"] and all(data["identical_tokens"].values())
    roofline = data["attention_roofline"]
    assert roofline["chosen_form"] == "expanded" and set(roofline["forms"]) == {"absorbed", "expanded"}
    assert roofline["forms"]["expanded"]["flops"] < roofline["forms"]["absorbed"]["flops"]
    assert all(_positive(f["over_roofline"]) for f in roofline["forms"].values())


def test_quick_serving_without_vllm(tmp_path, monkeypatch):
    """The serving benchmark where no vLLM is available (this suite's environment): the vLLM rows are recorded
    as skipped with the reason, the transformers rows of both optimized paths are measured at every point of
    the quick grid and compared, and the JSON and Markdown are written."""
    import importlib.util

    from benchmarks import serving

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable here: the serving benchmark would start engines (run it by hand)")
    monkeypatch.delenv(serving.VLLM_PYTHON_ENV, raising=False)
    monkeypatch.setenv("GQLA_VLLM_ENV", str(tmp_path / "no-vllm-env"))  # not .ci/run's .venv-vllm either
    data = serving.run(str(tmp_path), quick=True, compile=False)
    cfg = serving.settings(True)
    assert data["vllm_python"] is None and "vLLM is not importable" in data["vllm_skipped"] and data["engines"] == []
    points = {(r["path"], r["threads"], r["context"], r["batch"]) for r in data["rows"]}
    assert points == {(p, t, c, b) for p in serving.PATHS for t in cfg["threads"] for c in cfg["contexts"]
                      for b in cfg["batches"]}
    assert all(_positive(r["tokens_per_s"]) and r["row"].startswith("transformers") for r in data["rows"])
    assert len(data["comparisons"]) == len(cfg["threads"]) * len(cfg["contexts"]) * len(cfg["batches"])
    assert all(c["faster"] in serving.PATHS and c["auto_choice"] in serving.PATHS
               and c["auto_was_faster"] == (c["auto_choice"] == c["faster"]) for c in data["comparisons"])
    assert data["model"]["parameters"] > 1e7 and data["model"]["kv_lora_rank"] == 512
    assert json.loads((tmp_path / "serving.json").read_text())["rows"] == json.loads(json.dumps(data["rows"]))
    assert "vLLM rows skipped" in (tmp_path / "serving.md").read_text()


def test_a_request_variant_whose_process_fails_raises_with_its_last_lines(tmp_path):
    """Each variant runs in its own process; one that fails is an error naming the variant and showing the
    child's last lines, not a missing row."""
    from benchmarks import request

    spec = {"folder": str(tmp_path / "no-checkpoint-here"), "name": "absorbed", "settings": request.settings(True),
            "compile": False, "threads": 1}
    with pytest.raises(RuntimeError, match=r"(?s)'absorbed' process failed.*no-checkpoint-here"):
        request._run_child(spec, log=lambda *_: None)


def test_request_warm_up_compiles_every_regime_the_timed_requests_hit():
    """The request benchmark's warm-up holds a request of every (prompt, cache length) regime on either side of
    Inductor's reduction specialisation that a measured request falls in, at lengths no measured request has;
    batch 4 stops at the capped prompt."""
    from benchmarks import request

    cfg = request.settings(quick=False)
    chunk, longest = request.INDUCTOR_REDUCTION_CHUNK, max(cfg["answers"])
    for batch in cfg["batches"]:
        measured = request.prompts(cfg, batch)
        shapes = request.warm_up_shapes(cfg, batch)
        regimes = {(p > chunk, p + a > chunk) for p, a in shapes}
        assert {(p > chunk, p + longest > chunk) for p in measured} <= regimes
        assert not {p for p, _ in shapes} & set(measured)
    assert request.prompts(cfg, 4) == [256, 1024, 4096] and request.prompts(cfg, 1)[-1] == 8192
