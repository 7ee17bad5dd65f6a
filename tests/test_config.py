import contextlib

import pytest

from kd.config import PretrainConfig, parse_cli
from kd.config_checks import validate_pretrain
from kd.errors import KDError


def test_presets_parse_and_validate():
    for preset in ("configs/demo.yaml", "configs/demo_teacher.yaml", "configs/bert_large_to_6l.yaml",
                   "configs/distilbert.yaml"):
        cfg = parse_cli(PretrainConfig, ["--config", preset])
        validate_pretrain(cfg)
        assert cfg.run_name


def test_override_is_applied_and_typed():
    cfg = parse_cli(PretrainConfig, ["--config", "configs/demo.yaml", "train.lr=3e-4", "train.max_steps=8"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 8


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(KDError) as err:
        parse_cli(PretrainConfig, ["--config", "configs/demo.yaml", "train.max_step=8"])
    assert "train.max_step" in str(err.value) and "train.max_steps" in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nloss:\n  temprature: 2.0\n")
    with pytest.raises(KDError) as err:
        parse_cli(PretrainConfig, ["--config", str(bad)])
    assert "loss.temprature" in str(err.value) and "loss.temperature" in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(KDError) as err:
        parse_cli(PretrainConfig, ["--config", "configs/demo.yaml", "train.max_steps=many"])
    assert "train.max_steps" in str(err.value)


def test_missing_run_name_and_missing_file():
    with pytest.raises(KDError, match="run_name"):
        parse_cli(PretrainConfig, [])
    with pytest.raises(KDError, match="not found"):
        parse_cli(PretrainConfig, ["--config", "configs/nope.yaml"])


@pytest.mark.parametrize("override, message", [
    ("loss.kd_direction=sideways", "loss.kd_direction"),
    ("student.init=magic", "student.init"),
    ("loss.kd_loss_scale=1.0 loss.alpha_mlm=0", "kd_loss_scale"),
    ("teacher.name=null", "teacher.name"),
])
def test_contradictory_or_invalid_options(override, message):
    cfg = parse_cli(PretrainConfig, ["--config", "configs/demo.yaml", *override.split()])
    with pytest.raises(KDError, match=message):
        validate_pretrain(cfg)


def test_amp_on_cpu_says_once_that_it_runs_fp32(caplog, monkeypatch):
    import logging

    import torch

    from kd import optim
    monkeypatch.setattr(optim, "_warned_cpu_amp", [])
    with caplog.at_level(logging.INFO, logger="kd.optim"):
        for _ in range(3):
            assert optim.autocast_for(torch.device("cpu"), "bf16") is contextlib.nullcontext
        optim.autocast_for(torch.device("cpu"), "none")
    said = [r.getMessage() for r in caplog.records if "applies on CUDA only" in r.getMessage()]
    assert said == ["train.amp=bf16 applies on CUDA only: this cpu run computes in fp32 (faster on CPU); "
                    "set train.amp=none to silence this"]


def test_the_mission_preset_is_one_override_away_from_a_pruned_6x768_student():
    from transformers import BertConfig

    from kd.prune import check_pruned_shape
    cfg = parse_cli(PretrainConfig, ["--config", "configs/bert_large_to_6l.yaml", "student.init=pruned",
                                     "student.hidden_size=768"])
    validate_pretrain(cfg)
    bert_large = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    assert check_pruned_shape(cfg.student, bert_large) == {"num_layers": 6, "hidden_size": 768, "num_heads": 12,
                                                           "intermediate_size": 3072, "head_dim": 64}
