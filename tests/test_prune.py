"""Pruned init (kd/prune.py) on real tiny BERTs: full size is the teacher, importance ranks a case
built by hand, heads and neurons are sliced whole, and a pruned run exports a loadable model."""
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from kd.config import PretrainConfig, StudentConfig, load_config
from kd.errors import KDError
from kd.models import build_pruned_student
from kd.prune import activation_importance, check_pruned_shape, choose

torch.manual_seed(0)


def tiny_teacher(layers=3, hidden=64, heads=4, ffn=96):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms, so channel slicing is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model


def calibration(n=3, batch=4, seq=16, vocab=300):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab, (batch, seq), generator=gen) for _ in range(n)]


def student_cfg(**kw):
    return StudentConfig(init="pruned", **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pruning_to_the_full_size_reproduces_the_teacher():
    teacher = tiny_teacher()
    student, ranking = build_pruned_student(student_cfg(num_layers=3), teacher, calibration())
    ids = calibration(1)[0]
    assert torch.allclose(logits(student.eval(), ids), logits(teacher, ids), atol=1e-5)
    assert ranking["kept"]["layers"] == [0, 1, 2] and ranking["kept"]["hidden"] == list(range(64))


def test_importance_ranks_a_case_built_by_hand():
    teacher = tiny_teacher()
    with torch.no_grad():
        layer0 = teacher.bert.encoder.layer[0]
        layer0.attention.self.value.weight[16:32] = 0   # head 1 of layer 0 outputs nothing
        layer0.attention.self.value.bias[16:32] = 0
        layer0.attention.self.value.weight[32:48] *= 3  # head 2 of layer 0 outputs the most
        layer0.intermediate.dense.weight[7] = 0          # neuron 7 of layer 0: GELU(0) = 0
        layer0.intermediate.dense.bias[7] = 0
        layer1 = teacher.bert.encoder.layer[1]          # layer 1 adds nothing to the residual stream
        for dense in (layer1.attention.output.dense, layer1.output.dense):
            dense.weight.zero_()
            dense.bias.zero_()
        for norm in (layer1.attention.output.LayerNorm, layer1.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        for module in teacher.modules():                # channel 5 is zero after every LayerNorm
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[5], module.bias[5] = 0.0, 0.0
    imp = activation_importance(teacher, calibration())
    heads0 = imp["heads"][0].tolist()
    assert heads0[1] == pytest.approx(0.0, abs=1e-6) and max(heads0) == heads0[2]
    assert imp["ffn"][0][7] == pytest.approx(0.0, abs=1e-6) and imp["ffn"][0][7] < imp["ffn"][0].min() + 1e-9
    assert imp["hidden"][5] == pytest.approx(0.0, abs=1e-6)
    # layer 1 maps its input x (a LayerNorm output) to LayerNorm(LayerNorm(x)), a rescaled x: cosine ~1
    others = [float(imp["layers"][i]) for i in (0, 2)]
    assert imp["layers"].argmin().item() == 1 and imp["layers"][1] < 0.1 * min(others)
    keep = choose(imp, {"num_layers": 2, "num_heads": 2, "intermediate_size": 90, "hidden_size": 60})
    assert keep["layers"] == [0, 2] and 1 not in keep["heads"][0] and 2 in keep["heads"][0]
    assert 7 not in keep["ffn"][0] and 5 not in keep["hidden"]


def test_pruned_ffn_neurons_equal_the_teacher_with_those_neurons_zeroed():
    """All layers, heads and channels kept, 60 of 96 neurons: the student computes what the teacher
    computes once the dropped neurons' pre-activations are zero (GELU(0) = 0), so each neuron's
    input row and output column moved together."""
    teacher = tiny_teacher()
    student, ranking = build_pruned_student(student_cfg(num_layers=3, intermediate_size=60), teacher, calibration())
    zeroed = tiny_teacher()
    with torch.no_grad():
        for t_idx, layer in enumerate(zeroed.bert.encoder.layer):
            for n in set(range(96)) - set(ranking["kept"]["ffn"][str(t_idx)]):
                layer.intermediate.dense.weight[n] = 0
                layer.intermediate.dense.bias[n] = 0
    ids = calibration(1)[0]
    assert torch.allclose(logits(student.eval(), ids), logits(zeroed, ids), atol=1e-5)


def test_heads_keep_their_q_k_v_rows_and_o_columns_together():
    """BERT ties the attention width to the hidden size, so 2 of 4 heads means 32 of 64 channels:
    student head j is teacher head kept[j] in Q, K, V (rows) and O (columns), on the kept channels."""
    teacher = tiny_teacher()
    student, ranking = build_pruned_student(student_cfg(num_layers=2, hidden_size=32, num_heads=2,
                                                        intermediate_size=48), teacher, calibration())
    assert student.config.num_attention_heads == 2 and student.config.hidden_size == 32
    ch = torch.tensor(ranking["kept"]["hidden"])
    for s_idx, t_idx in enumerate(ranking["kept"]["layers"]):
        kept = ranking["kept"]["heads"][str(t_idx)]
        assert len(kept) == 2
        s_attn, t_attn = student.bert.encoder.layer[s_idx].attention, teacher.bert.encoder.layer[t_idx].attention
        for j, h in enumerate(kept):
            rows_s, rows_t = slice(16 * j, 16 * (j + 1)), slice(16 * h, 16 * (h + 1))
            for name in ("query", "key", "value"):
                assert torch.equal(getattr(s_attn.self, name).weight[rows_s], getattr(t_attn.self, name).weight[rows_t][:, ch])
                assert torch.equal(getattr(s_attn.self, name).bias[rows_s], getattr(t_attn.self, name).bias[rows_t])
            assert torch.equal(s_attn.output.dense.weight[:, rows_s], t_attn.output.dense.weight[ch][:, rows_t])
    # embeddings, the MLM head and the tied decoder on the same channels
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight[:, ch])
    assert student.cls.predictions.decoder.weight.data_ptr() == student.bert.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(student.cls.predictions.transform.dense.weight, teacher.cls.predictions.transform.dense.weight[ch][:, ch])


@pytest.mark.parametrize("kw, message", [
    ({"hidden_size": 48, "num_heads": 5}, r"student.hidden_size=48 does not divide into student.num_heads=5"),
    ({"hidden_size": 64, "num_heads": 8}, r"student.num_heads=8, but the teacher has 4 heads per layer; .*1..4"),
    ({"hidden_size": 64, "num_heads": 2}, r"32-dim heads, but pruning keeps whole teacher heads of 16 dims: set "
                                          r"student.num_heads=4"),
    ({"hidden_size": 128}, r"student.hidden_size=128: .*\[1, 64\]"),
    ({"num_layers": 5}, r"student.num_layers=5: .*\[1, 3\]"),
])
def test_bad_pruned_shapes_name_the_key_and_the_range(kw, message):
    cfg = student_cfg(**{"num_layers": 2, **kw})
    with pytest.raises(KDError, match=message):
        check_pruned_shape(cfg, tiny_teacher().config)


def test_pruning_without_a_teacher_is_refused():
    from kd.config_checks import validate_pretrain
    cfg = load_config(PretrainConfig, None, ["run_name=x", "teacher.name=null", "student.init=pruned",
                                             "loss.alpha_kd=0", "loss.alpha_hidden=0"])
    with pytest.raises(KDError, match="student.init=pruned slices the teacher, but teacher.name is not set"):
        validate_pretrain(cfg)


def test_a_pruned_run_writes_its_ranking_and_exports_a_loadable_model(tmp_path, tiny_teacher_dir, corpus_file,
                                                                      shared_cache):
    from transformers import AutoModelForMaskedLM

    from kd.pretrain import run_pretraining
    from tests.conftest import tiny_overrides
    cfg = load_config(PretrainConfig, None, tiny_overrides(
        tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="pruned", steps=2,
        **{"student.init": "pruned", "student.hidden_size": 32, "student.num_heads": 1,
           "student.intermediate_size": 64, "student.prune_calibration_batches": 2}))
    metrics = run_pretraining(cfg)
    assert metrics["eval/mlm_ce"] > 0
    ranking = json.loads((tmp_path / "logs" / "pruned" / "prune_ranking.json").read_text())
    assert len(ranking["kept"]["layers"]) == 2 and len(ranking["kept"]["hidden"]) == 32
    assert len(ranking["importance"]["heads"]) == 4 and len(ranking["importance"]["heads"][0]) == 2
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "ckpt" / "pruned" / "final")
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads,
            model.config.intermediate_size) == (2, 32, 1, 64)
