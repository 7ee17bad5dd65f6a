"""Attention-based terms in a real pretraining run: logged by name, weighted by their alphas, their
inputs captured from the layers that need them while every layer keeps SDPA; bad settings refused."""
import json

import pytest
import torch
from transformers import BertForMaskedLM

from kd.config import PretrainConfig, load_config
from kd.errors import KDError
from kd.models import capture_qkv
from kd.objective import attention_terms_for
from kd.pretrain import run_pretraining
from tests.conftest import tiny_bert_config, tiny_overrides


def test_capture_qkv_returns_the_projections_of_the_named_layers_only():
    torch.manual_seed(0)
    config = tiny_bert_config()
    config._attn_implementation = "sdpa"
    model = BertForMaskedLM(config).eval()
    ids = torch.randint(1000, 2000, (2, 8))
    with torch.no_grad():
        with capture_qkv(model, [2]) as qkv:
            out = model.bert(input_ids=ids, output_hidden_states=True)
        attention = model.bert.encoder.layer[2].attention.self
        x = out.hidden_states[2]  # the input of encoder layer 2
        for got, linear in zip(qkv[2], (attention.query, attention.key, attention.value)):
            assert torch.allclose(got, linear(x), atol=1e-6)
    assert list(qkv) == [2]
    assert model.config._attn_implementation == "sdpa"
    assert not attention.query._forward_hooks  # hooks are gone after the block


def test_each_attention_term_is_logged_by_name_and_weighted(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    extra = {"loss.alpha_attn_kl": 1.0, "loss.alpha_relation_kl": 0.5, "loss.alpha_attn_mse": 0.25,
             "loss.attn_teacher_layer": 2}
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache,
                                                           run_name="attn", steps=2, **extra))
    run_pretraining(cfg)
    records = [json.loads(line) for line in open(tmp_path / "logs" / "attn" / "metrics.jsonl")]
    train = [r for r in records if "train/loss" in r][0]
    # student: 2 layers, last = 1; teacher layer 2 for the MiniLM terms; TinyBERT on the uniform map 1<-2, 2<-4
    names = ["attn_kl_1_2", "relation_qq_1_2", "relation_kk_1_2", "relation_vv_1_2", "attn_mse_0_1", "attn_mse_1_3"]
    for name in names:
        assert train[f"train/{name}"] >= 0, name
    weights = {"mlm_ce": 2.0, "kd_kl": 5.0, "attn_kl_1_2": 1.0, "relation_qq_1_2": 0.5, "relation_kk_1_2": 0.5,
               "relation_vv_1_2": 0.5, "attn_mse_0_1": 0.125, "attn_mse_1_3": 0.125,
               "hidden_cos_1_2": 0.5, "hidden_cos_2_4": 0.5}
    total = sum(w * train[f"train/{k}"] for k, w in weights.items())
    assert train["train/loss"] == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("extra, message", [
    ({"loss.alpha_relation_kl": 1.0, "loss.attn_teacher_layer": 4},
     r"loss.attn_teacher_layer=4 is out of range: the model has 4 encoder layers, so use 0..3"),
    ({"loss.alpha_relation_kl": 1.0, "loss.attn_student_layer": -1},
     r"loss.attn_student_layer=-1 is out of range: .* 0..1"),
    ({"loss.alpha_relation_kl": 1.0, "loss.relation_heads": 5}, r"loss.relation_heads=5 must divide both widths"),
    ({"loss.alpha_attn_kl": 1.0, "student.num_heads": 4},
     r"loss.alpha_attn_kl compares attention head by head, so the student needs the teacher's 2 heads \(it has 4\)"),
])
def test_bad_attention_settings_name_the_key_and_range(extra, message, tiny_teacher_dir):
    from kd.models import build_student, load_teacher
    init = ["student.init=random"] if "student.num_heads" in extra else []  # 4 heads of the teacher's width
    cfg = load_config(PretrainConfig, None, ["run_name=x", f"teacher.name={tiny_teacher_dir}", "student.num_layers=2",
                                             *init, *[f"{k}={v}" for k, v in extra.items()]])
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    student = build_student(cfg.student, teacher, 30522)
    with pytest.raises(KDError, match=message):
        attention_terms_for(cfg.loss, teacher.config, student.config)


def test_attention_terms_with_a_teacher_cache_are_refused():
    from kd.config_checks import validate_pretrain
    cfg = load_config(PretrainConfig, None, ["run_name=x", "teacher.name=t", "teacher_cache.path=c",
                                             "loss.alpha_hidden=0", "loss.alpha_relation_kl=1"])
    with pytest.raises(KDError, match="loss.alpha_relation_kl=1.0 but teacher_cache.path is set: attention terms"):
        validate_pretrain(cfg)
