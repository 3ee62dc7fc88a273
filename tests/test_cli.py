"""The report and demo commands end to end through ``gqla_compile.cli.main``, and their argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqla_compile.cli import main
from gqla_compile.tiny import tiny_gqla


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-gqla"
    AutoModelForCausalLM.from_config(tiny_gqla()).save_pretrained(folder)
    return folder


def test_report_text_to_stdout(model_folder, capsys):
    assert main(["--quiet", "report", str(model_folder), "--target", "h100", "--path", "absorbed"]) == 0
    out = capsys.readouterr().out
    assert "gqla_compile report: GqlaForCausalLM" in out and "absorbed *" in out and "graph diff" in out


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_report_formats_to_files(model_folder, tmp_path, capsys, fmt):
    out = tmp_path / f"report.{fmt}"
    args = ["--quiet", "report", str(model_folder), "--target", "h20", "--s-q", "2", "--format", fmt,
            "--output", str(out)]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    if fmt == "md":
        assert text.startswith("# gqla_compile report") and "| path" in text and "s_q=2" in text
    else:
        assert text.startswith("<!DOCTYPE html>") and "<svg" in text


def test_report_json_of_a_tiny_config_name(tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["--quiet", "report", "tiny-deepseek-v3", "--target", "h100", "--batch", "2", "--context", "1024",
            "--format", "json", "--output", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "DeepseekV3ForCausalLM" and data["layers"][0]["count"] == 2
    assert data["cache"]["batch_size"] == 2 and data["cache"]["context_len"] == 1024


def test_demo(capsys):
    assert main(["--quiet", "demo", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo OK")
    assert "h100 s_q=1: absorbed" in lines[0] and "h20 s_q=2: grouped" in lines[0] and "tokens identical" in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "{missing}", "--target", "h100"], "neither a local model folder"),
        (["report", "no-such-tiny-model", "--target", "h100"], "neither a local model folder"),
        (["report", "{folder}", "--target", "h100", "--format", "pdf"], "unknown format"),
        (["report", "{folder}", "--target", "h100", "--format", "html"], "--output"),
        (["report", "{folder}", "--target", "no-such-chip"], "unknown target"),
        (["report", "{folder}", "--target", "h100", "--s-q", "0"], "--s-q"),
    ],
)
def test_report_usage_errors(model_folder, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "absent", folder=model_folder) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("gqla-compile report: error:")


@pytest.mark.parametrize("args", [["report"], ["report", "tiny-gqla"], ["report", "tiny-gqla", "--target", "h100",
                                                                      "--path", "diagonal"], ["demo", "--bogus"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and f"gqla-compile {command}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["plan", "{missing}"], "neither a local model folder"),
    (["plan", "tiny-llama", "--target", "h100"], "has no latent attention"),
    (["bench", "{missing}", "--quick"], "neither a local model folder"),
    (["bench", "tiny-llama", "--quick"], "has no latent attention"),
    (["bench", "tiny-gqla", "--target", "no-such-chip", "--quick"], "no-such-chip"),
    (["convert", "{missing}", "{out}"], "neither a local model folder"),
    (["convert", "tiny-llama", "{folder}"], "already exists"),
    (["report", "{missing}", "--target", "h100"], "neither a local model folder"),
])
def test_every_command_exits_2_with_one_line_on_a_usage_error(model_folder, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "absent", out=tmp_path / "out", folder=model_folder) for a in args]
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith(f"gqla-compile {args[0]}: error:")
