"""gqla_compile.heal: distillation lowers the loss on a tiny converted model, checkpoints are atomic and a resumed
run reaches the same state as an uninterrupted one; the command line runs end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqla_compile import heal as heal_module
from gqla_compile.cli import main as cli_main
from gqla_compile.conversion import convert
from gqla_compile.conversion.calibration import random_token_sequences
from gqla_compile.heal import HealConfig, HealError, distillation_loss, heal
from gqla_compile.tiny import tiny_llama

VOCAB = tiny_llama().vocab_size
TEXTS = random_token_sequences(VOCAB, num_samples=16, seq_len=64, seed=3)
CONFIG = HealConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, seed=1)


def make_pair():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama()).eval()
    # a lossy start with room to heal: no output fit, the plain RMS key/value balance
    student = convert(teacher, kv_lora_rank=8, qk_rope_head_dim=8, calibration=TEXTS[:8], progress=False,
                      fit_output=False, balance="rms")
    return student, teacher


def training_loss(student, teacher):
    """The distillation loss over every training window (what healing minimizes)."""
    ids = torch.cat([torch.stack(TEXTS)[:, :32], torch.stack(TEXTS)[:, 32:]])
    with torch.no_grad():
        return float(distillation_loss(student, teacher, ids))


def test_healing_lowers_the_distillation_loss_and_trains_attention_only():
    student, teacher = make_pair()
    before_state = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = training_loss(student, teacher)
    result = heal(student, teacher, TEXTS, config=CONFIG, progress=False)
    assert result.step == CONFIG.steps and len(result.losses) == CONFIG.steps
    assert training_loss(student, teacher) < 0.9 * before
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed and all(".self_attn." in k for k in changed)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in student.parameters())


def test_hidden_state_matching_adds_to_the_loss():
    student, teacher = make_pair()
    ids = torch.stack(TEXTS[:2])[:, :32]
    with torch.no_grad():
        plain = distillation_loss(student, teacher, ids)
        with_hidden = distillation_loss(student, teacher, ids, hidden_weight=1.0)
        assert float(distillation_loss(teacher, teacher, ids, hidden_weight=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(with_hidden) > float(plain) > 0


def test_resume_from_a_checkpoint_reaches_the_same_state(tmp_path):
    straight, teacher = make_pair()
    heal(straight, teacher, TEXTS, config=CONFIG, progress=False)

    resumed, teacher = make_pair()
    folder = tmp_path / "ckpt"
    first = heal(resumed, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=folder, checkpoint_every=4,
                 stop_after=5)
    assert first.step == 5 and json.loads((folder / "heal_state.json").read_text())["step"] == 5
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # written atomically: no staging folder left
    fresh, teacher = make_pair()  # a new process would start from the converted model again
    second = heal(fresh, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=folder)
    assert second.resumed_from == 5 and second.step == CONFIG.steps and len(second.losses) == CONFIG.steps - 5
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_checkpoint_of_other_settings_and_bad_input_are_refused(tmp_path):
    student, teacher = make_pair()
    folder = tmp_path / "ckpt"
    heal(student, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=folder, stop_after=2)
    other = HealConfig(**{**CONFIG.__dict__, "lr": 1e-3})
    with pytest.raises(HealError, match="other settings"):
        heal(student, teacher, TEXTS, config=other, progress=False, checkpoint_dir=folder)
    with pytest.raises(HealError, match="tokenizer"):
        heal(student, teacher, ["some text"], config=CONFIG, progress=False)
    with pytest.raises(HealError, match="fewer than one window"):
        heal(student, teacher, [TEXTS[0][:10]], config=CONFIG, progress=False)
    with pytest.raises(HealError, match="trainable"):
        heal(student, teacher, TEXTS, config=HealConfig(trainable="mlp"), progress=False)


def test_schedule_warms_up_then_decays():
    config = HealConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [heal_module.lr_factor(step, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] >= 0.1


def test_cli_heal_writes_a_loadable_model(tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    student, teacher = make_pair()
    vocab = {chr(ord("a") + i): i for i in range(26)} | {"[UNK]": 26}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    args = [str(tmp_path / "student"), str(tmp_path / "teacher"), str(text), str(tmp_path / "healed"),
            "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1"]
    assert cli_main(["-q", "heal", *args]) == 0
    assert "3 steps" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "healed").config.model_type == "gqla"
    assert (tmp_path / "healed.checkpoint" / "heal_state.json").is_file()
    assert cli_main(["-q", "heal", *args]) == 2  # the output exists: needs --force
    assert "--force" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_or_a_foreign_folder_is_refused(tmp_path):
    """Same settings and tensor names, another model: resuming would swap in the other model's weights."""
    student, teacher = make_pair()
    folder = tmp_path / "ckpt"
    heal(student, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=folder, stop_after=2)
    other, teacher = make_pair()
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01 * torch.randn_like(param))
    with pytest.raises(HealError, match="another run.*student"):
        heal(other, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=folder)
    # the same model healed on in stages (its weights are where the checkpoint stopped) resumes
    assert heal(student, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=folder, stop_after=4).step == 4
    fresh, teacher = make_pair()  # and so does the converted model it started from
    assert heal(fresh, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=folder, stop_after=5).step == 5
    fresh, teacher = make_pair()
    with pytest.raises(HealError, match="another run.*windows"):
        heal(fresh, teacher, TEXTS[::-1], config=CONFIG, progress=False, checkpoint_dir=folder)
    foreign = tmp_path / "my_model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(HealError, match="holds no healing checkpoint"):
        heal(fresh, teacher, TEXTS, config=CONFIG, progress=False, checkpoint_dir=foreign)
    assert sorted(os.listdir(foreign)) == ["config.json"]
