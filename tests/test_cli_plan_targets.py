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
                              "rope_key": "shared",  # --rope-key auto: k_R kept once reads fewer bytes
                              # dense attention (a DSA model's plan gives its index top-k and indexer dims)
                              "top_k": None, "index_dims": None}


@pytest.mark.parametrize("args, message", [
    (["plan", "no-such-model"], "neither a local model folder nor a built-in tiny config"),
    (["plan", "tiny-llama", "--target", "h100"], "has no latent attention"),
    (["plan", "tiny-deepseek-v3", "--target", "tpu"], "known targets: h100"),
    (["plan", "tiny-deepseek-v3", "--target", "h100", "--s-q", "0"], "--s-q must be a positive integer"),
    (["plan", "tiny-deepseek-v3", "--target", "h100", "--tp", "3"], "tp=3 does not divide"),
])
def test_plan_usage_errors_exit_2_with_one_line(args, message, capsys):
    """Usage errors exit 2 with one line on stderr, as in every command (test_cli.py: report)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("gqla-compile plan: error:")


def test_plan_missing_folder(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
