import pytest
import torch
from transformers import BertForMaskedLM

from kd.config import StudentConfig
from kd.errors import KDError
from kd.models import (DistillationStudent, build_student, default_hidden_map, default_init_layers,
                       load_mlm_model, load_teacher, mlm_forward)
from tests.conftest import tiny_bert_config


def test_default_layer_choices():
    assert default_init_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert default_init_layers(24, 6) == [0, 4, 8, 12, 16, 20]
    assert default_init_layers(6, 3) == [0, 2, 4]
    # hidden_states indices: student i <- teacher i * L_T / L_S (TinyBERT uniform map)
    assert default_hidden_map(24, 6, False) == [(1, 4), (2, 8), (3, 12), (4, 16), (5, 20), (6, 24)]
    assert default_hidden_map(6, 3, True) == [(0, 0), (1, 2), (2, 4), (3, 6)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config(layers=4)).eval()


def test_teacher_layers_init_copies_tensors(teacher):
    student = build_student(StudentConfig(num_layers=2, init="teacher_layers", init_layers=[1, 3]), teacher, 30522)
    for s_idx, t_idx in enumerate([1, 3]):
        s_state = student.bert.encoder.layer[s_idx].state_dict()
        for name, tensor in teacher.bert.encoder.layer[t_idx].state_dict().items():
            assert torch.equal(s_state[name], tensor), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.cls.predictions.transform.dense.weight, teacher.cls.predictions.transform.dense.weight)
    # the decoder stays tied to the (copied) word embeddings
    assert student.cls.predictions.decoder.weight.data_ptr() == student.bert.embeddings.word_embeddings.weight.data_ptr()


def test_student_deeper_than_teacher_is_refused(teacher):
    with pytest.raises(KDError, match="deeper than the teacher"):
        build_student(StudentConfig(num_layers=6, init="teacher_layers"), teacher, 30522)


def test_width_mismatch_needs_random_init_and_gets_a_projection(teacher):
    with pytest.raises(KDError, match="width"):
        build_student(StudentConfig(num_layers=2, hidden_size=32, init="teacher_layers"), teacher, 30522)
    student = build_student(StudentConfig(num_layers=2, hidden_size=32, num_heads=2, init="random"), teacher, 30522)
    module = DistillationStudent(student, [(1, 2), (2, 4)], teacher_width=64)
    ids = torch.randint(1000, 2000, (2, 16))
    logits, hidden, _ = module(ids, torch.tensor([[1, 5], [2, 3]]))
    assert logits.shape == (2, 2, 30522)
    assert [h.shape[-1] for h in hidden] == [64, 64]


def test_vocab_mismatch_is_refused(teacher):
    with pytest.raises(KDError, match="vocabulary"):
        build_student(StudentConfig(num_layers=2, init="random"), teacher, 1000)


def test_gathered_head_equals_full_head_at_positions(teacher):
    ids = torch.randint(1000, 2000, (2, 16))
    positions = torch.tensor([[1, 4, 9], [2, 3, 15]])
    gathered, _ = mlm_forward(teacher, ids, positions)
    full = teacher(input_ids=ids).logits
    expected = torch.stack([full[b, positions[b]] for b in range(2)])
    torch.testing.assert_close(gathered, expected, rtol=1e-5, atol=1e-5)


def test_packaged_minilm_without_mlm_head_is_refused_as_teacher():
    with pytest.raises(KDError, match="no trained MLM head"):
        load_mlm_model("packaged-minilm", "teacher", require_head=True)


def test_missing_local_teacher_path_fails_fast():
    class Cfg:
        name, trust_remote_code = "/nonexistent/teacher", False
    with pytest.raises(KDError, match="/nonexistent/teacher"):
        load_teacher(Cfg, torch.device("cpu"))
