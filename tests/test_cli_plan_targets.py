"""``gqla-compile targets`` and ``gqla-compile plan`` through the CLI's main()."""

import json

import pytest

from gqla_compile.cli import main
from gqla_compile.tiny import tiny_deepseek_v3


def test_targets_lists_builtins_with_ridges(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("h100", "h800", "h20", "h200", "a100", "l40s", "b200", "mi300x"):
        assert name in out
    assert "ridge" in out and " 295" in out and " 37" in out
    assert "cpu" not in out.split("dense")[0]  # measured only on request


def test_targets_measure_adds_cpu(capsys):
    assert main(["targets", "--measure"]) == 0
    assert any(line.startswith("cpu ") for line in capsys.readouterr().out.splitlines())


def test_plan_tiny_config_table(capsys):
    assert main(["plan", "tiny-deepseek-v3", "--target", "h20", "--s-q", "2"]) == 0
    out = capsys.readouterr().out
    assert "attention_core" in out and "wins on h20 at s_q=2" in out


def test_plan_folder_json(tmp_path, capsys):
    tiny_deepseek_v3().save_pretrained(tmp_path)
    args = ["plan", str(tmp_path), "--target", "H100", "--batch", "4", "--context", "128", "--tp", "2",
            "--dtype", "float16", "--path", "grouped", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["path"] == "grouped" and data["target"]["name"] == "h100"
    assert data["inputs"] == {"s_q": 1, "batch_size": 4, "context_len": 128, "tp": 2, "dtype": "float16",
                              "rope_key": "copied"}


@pytest.mark.parametrize("args, code, message", [
    (["plan", "no-such-model"], 2, "neither a folder with config.json nor a built-in config"),
    (["plan", "tiny-llama", "--target", "h100"], 1, "NoLatentAttentionError"),
    (["plan", "tiny-deepseek-v3", "--target", "tpu"], 1, "known targets: h100"),
    (["plan", "tiny-deepseek-v3", "--target", "h100", "--s-q", "0"], 1, "s_q must be a positive integer"),
])
def test_plan_errors_are_one_line(args, code, message, capsys):
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_plan_missing_folder(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
