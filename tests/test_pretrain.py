"""End-to-end pretraining on a tiny teacher and real Wikipedia text: single process, resume, DDP."""
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from kd.config import PretrainConfig, load_config
from kd.pretrain import run_pretraining
from tests.conftest import PY, TORCHRUN, run_script, tiny_overrides


def read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def final_weights(ckpt_dir, run):
    return load_file(os.path.join(ckpt_dir, run, "final", "model.safetensors"))


def run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, **kw):
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, **kw))
    return run_pretraining(cfg)


def test_logs_every_term_and_exports_a_fill_mask_model(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    metrics = run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="full")
    records = read_metrics(tmp_path / "logs" / "full")
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # every term, unweighted, under its own name (4-layer teacher, 2-layer student: pairs 1<-2, 2<-4)
    for key in ("train/mlm_ce", "train/kd_kl", "train/hidden_cos_1_2", "train/hidden_cos_2_4", "lr", "tokens_per_s"):
        assert all(key in r for r in train), key
    assert train[-1]["tokens_seen"] == 6 * 4 * 64
    assert {"eval/perplexity", "eval/masked_accuracy", "eval/teacher_agreement"} <= set(evals[-1])
    assert metrics["eval/perplexity"] == pytest.approx(torch.exp(torch.tensor(metrics["eval/mlm_ce"])).item(), rel=1e-4)
    # the export loads with from_pretrained and answers a fill-mask pipeline
    from transformers import AutoModelForMaskedLM, pipeline
    final = str(tmp_path / "ckpt" / "full" / "final")
    model = AutoModelForMaskedLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 2
    answers = pipeline("fill-mask", model=final, tokenizer=final)("The capital of France is [MASK].")
    assert len(answers) == 5 and all("token_str" in a for a in answers)
    run_info = json.loads((tmp_path / "logs" / "full" / "run.json").read_text())
    assert run_info["kind"] == "pretrain" and run_info["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_no_kd_baseline_logs_only_mlm(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="nokd", steps=2,
        **{"loss.alpha_kd": 0, "loss.alpha_hidden": 0})
    train = [r for r in read_metrics(tmp_path / "logs" / "nokd") if "train/loss" in r]
    assert set(k for k in train[0] if k.startswith("train/")) == {"train/loss", "train/mlm_ce"}


def test_resume_matches_uninterrupted_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="straight", steps=6,
        **{"train.save_every": 0, "train.resume": "none"})
    run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="halted", steps=6,
        **{"train.save_every": 3})
    ckpt = tmp_path / "ckpt" / "halted"
    # drop everything after step 3, as if the job had been killed right after that checkpoint
    for name in os.listdir(ckpt):
        if name != "step_000003":
            shutil.rmtree(ckpt / name) if (ckpt / name).is_dir() else os.remove(ckpt / name)
    run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="halted", steps=6,
        **{"train.save_every": 3, "train.resume": "auto"})
    straight = final_weights(tmp_path / "ckpt", "straight")
    resumed = final_weights(tmp_path / "ckpt", "halted")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_two_process_gloo_ddp(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    args = [TORCHRUN, "--standalone", "--nproc_per_node=2", "ddp_main.py",
            *tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="ddp", steps=4)]
    result = run_script(args)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "logs" / "ddp")
    train = [r for r in records if "train/loss" in r]
    assert train[-1]["step"] == 4
    assert train[-1]["tokens_seen"] == 4 * 2 * 4 * 64  # steps x ranks x batch x seq_len
    assert os.path.isfile(tmp_path / "ckpt" / "ddp" / "final" / "model.safetensors")
    ckpt = tmp_path / "ckpt" / "ddp" / "step_000004"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()


def test_hub_preset_fails_fast_offline_with_a_pointer_to_the_demo():
    start = time.time()
    result = run_script([PY, "ddp_main.py", "--config", "configs/bert_large_to_6l.yaml"], timeout=120)
    if result.returncode == 0:
        pytest.skip("the Hugging Face hub is reachable from this machine")
    assert time.time() - start < 30
    assert result.returncode == 2
    assert "bert-large-uncased" in result.stderr and "configs/demo.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_init_layers_from_copies_another_models_layers_while_the_teacher_teaches(
        tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    """student.init_layers_from: the copied layers come from that model; the KD targets still come
    from teacher.name (lr 0, so the export holds the initial weights)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    from tests.conftest import tiny_bert_config
    torch.manual_seed(123)
    source = BertForMaskedLM(tiny_bert_config())
    source.save_pretrained(tmp_path / "source")
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(tmp_path / "source")
    run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="layers", steps=1,
        **{"student.init_layers_from": str(tmp_path / "source"), "student.init_layers": "[3,0]",
           "train.lr": 0.0, "train.warmup_steps": 0})
    student = final_weights(tmp_path / "ckpt", "layers")
    teacher = BertForMaskedLM.from_pretrained(tiny_teacher_dir).state_dict()
    src = source.state_dict()
    for s_idx, t_idx in ((0, 3), (1, 0)):
        key = "encoder.layer.{}.attention.self.query.weight"
        assert torch.equal(student["bert." + key.format(s_idx)], src["bert." + key.format(t_idx)])
        assert not torch.equal(student["bert." + key.format(s_idx)], teacher["bert." + key.format(t_idx)])
    assert torch.equal(student["bert.embeddings.word_embeddings.weight"], src["bert.embeddings.word_embeddings.weight"])
    train = [r for r in read_metrics(tmp_path / "logs" / "layers") if "train/loss" in r]
    assert "train/kd_kl" in train[0]  # the teacher still teaches


def test_init_layers_from_needs_a_teacher_layers_init():
    from kd.config_checks import validate_pretrain
    from kd.errors import KDError
    cfg = load_config(PretrainConfig, None, ["run_name=x", "teacher.name=t", "student.init=random", "student.init_layers_from=x"])
    with pytest.raises(KDError, match="student.init_layers_from is for student.init=teacher_layers"):
        validate_pretrain(cfg)


def test_the_distilbert_recipe_runs_with_its_own_choices(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    """configs/distilbert.yaml's loss and masking on the tiny models: KL at every position, cosine on
    the last hidden layer only (hidden_states 2 <- 4), rare-token masks; the eval masks stay uniform."""
    from kd.config import parse_cli
    preset = parse_cli(PretrainConfig, ["--config", "configs/distilbert.yaml"])
    assert (preset.loss.kd_positions, preset.loss.hidden_layer_map, preset.data.mask_weighting) == \
        ("all", [[6, 12]], "rare")
    run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="db", steps=2,
        **{"loss.kd_positions": "all", "loss.hidden_layer_map": "[[2,4]]", "data.mask_weighting": "rare"})
    train = [r for r in read_metrics(tmp_path / "logs" / "db") if "train/loss" in r]
    assert {k for k in train[0] if k.startswith("train/")} == {"train/loss", "train/mlm_ce", "train/kd_kl",
                                                               "train/hidden_cos_2_4"}
