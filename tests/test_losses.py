import math

import pytest
import torch

from kd.losses import combine_terms, hidden_cosine, hidden_mse, kl_div_logits, mlm_cross_entropy


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_forward_kl_matches_hand_computed_distributions():
    # logits chosen so that softmax gives known probabilities
    p_teacher, q_student = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]
    t = torch.log(torch.tensor([p_teacher]))
    s = torch.log(torch.tensor([q_student]))
    assert kl_div_logits(s, t, temperature=1.0).item() == pytest.approx(kl(p_teacher, q_student), rel=1e-5)


def test_reverse_kl_swaps_the_arguments():
    p_teacher, q_student = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]
    t = torch.log(torch.tensor([p_teacher]))
    s = torch.log(torch.tensor([q_student]))
    value = kl_div_logits(s, t, temperature=1.0, direction="reverse").item()
    assert value == pytest.approx(kl(q_student, p_teacher), rel=1e-5)
    assert value != pytest.approx(kl(p_teacher, q_student), rel=1e-3)


def test_temperature_softens_and_scales_by_t_squared():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    s = torch.tensor([[0.5, 0.2, 0.1]])
    temperature = 3.0
    p = torch.softmax(t / temperature, -1)[0].tolist()
    q = torch.softmax(s / temperature, -1)[0].tolist()
    expected = temperature ** 2 * kl(p, q)
    assert kl_div_logits(s, t, temperature=temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kl_mask_averages_only_selected_positions():
    t = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    s = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.8, 0.1, 0.1]]))
    mask = torch.tensor([1.0, 0.0])
    assert kl_div_logits(s, t, 1.0, mask=mask).item() == pytest.approx(kl([0.7, 0.2, 0.1], [0.5, 0.3, 0.2]), rel=1e-5)


def test_kl_is_zero_for_identical_logits():
    logits = torch.randn(4, 7, 11)
    assert kl_div_logits(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_mlm_cross_entropy_is_mean_negative_log_likelihood():
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.6, 0.4]]]))
    labels = torch.tensor([[1, 0]])
    expected = -(math.log(0.75) + math.log(0.6)) / 2
    assert mlm_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_hidden_losses_ignore_masked_tokens():
    s = torch.tensor([[[1.0, 0.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0]])
    assert hidden_mse(s, t, mask).item() == pytest.approx(1.0)       # ((1)^2 + (1)^2) / 2
    assert hidden_cosine(s, t, mask).item() == pytest.approx(1.0)    # orthogonal: 1 - 0
    assert hidden_cosine(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_combine_terms_weights_and_balances():
    terms = {"mlm_ce": torch.tensor(2.0), "kd_kl": torch.tensor(8.0)}
    weights = {"mlm_ce": 1.0, "kd_kl": 0.5}
    assert combine_terms(terms, weights).item() == pytest.approx(2.0 + 4.0)
    # balanced: KD rescaled to 3x the weighted LM loss magnitude
    assert combine_terms(terms, weights, kd_loss_scale=3.0).item() == pytest.approx(2.0 + 6.0)


# ---- attention terms, against arithmetic done by hand --------------------------------------------

def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# one sequence of 2 tokens, width 2
S_Q, S_K, S_V = [[1.0, 0.0], [0.0, 2.0]], [[0.5, 1.0], [1.0, -1.0]], [[1.0, 1.0], [0.0, 3.0]]
T_Q, T_K, T_V = [[2.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [1.0, 1.0]]


def _t(rows):
    return torch.tensor([rows])


def _dot_rows(a, b, scale):
    return [[sum(x * y for x, y in zip(ra, rb)) / scale for rb in b] for ra in a]


def test_minilm_v1_attention_kl_by_hand():
    from kd.losses import attention_kl
    # one head of width 2: scores = q.k / sqrt(2), softmax over keys, KL(teacher || student) per row
    s_att = [_softmax(r) for r in _dot_rows(S_Q, S_K, math.sqrt(2))]
    t_att = [_softmax(r) for r in _dot_rows(T_Q, T_K, math.sqrt(2))]
    expected = (_kl(t_att[0], s_att[0]) + _kl(t_att[1], s_att[1])) / 2
    got = attention_kl(_t(S_Q), _t(S_K), _t(T_Q), _t(T_K), heads=1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # two heads of width 1: each head's scores are q_h * k_h (sqrt(1) = 1), then the mean over heads
    per_head = []
    for h in range(2):
        s = [_softmax([S_Q[i][h] * S_K[j][h] for j in range(2)]) for i in range(2)]
        t = [_softmax([T_Q[i][h] * T_K[j][h] for j in range(2)]) for i in range(2)]
        per_head.append([_kl(t[i], s[i]) for i in range(2)])
    expected2 = sum((per_head[0][i] + per_head[1][i]) / 2 for i in range(2)) / 2
    assert attention_kl(_t(S_Q), _t(S_K), _t(T_Q), _t(T_K), heads=2).item() == pytest.approx(expected2, rel=1e-5)


def test_minilm_v2_relation_kl_by_hand_and_with_different_widths():
    from kd.losses import relation_kl
    s_rel = [_softmax(r) for r in _dot_rows(S_V, S_V, math.sqrt(2))]
    t_rel = [_softmax(r) for r in _dot_rows(T_V, T_V, math.sqrt(2))]
    expected = (_kl(t_rel[0], s_rel[0]) + _kl(t_rel[1], s_rel[1])) / 2
    assert relation_kl(_t(S_V), _t(T_V), relation_heads=1).item() == pytest.approx(expected, rel=1e-5)
    # a 4-wide teacher against the 2-wide student: relations are S x S either way, no projection
    wide = [[2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 2.0]]
    t_rel = [_softmax(r) for r in _dot_rows(wide, wide, math.sqrt(4))]
    expected = (_kl(t_rel[0], s_rel[0]) + _kl(t_rel[1], s_rel[1])) / 2
    assert relation_kl(_t(S_V), _t(wide), relation_heads=1).item() == pytest.approx(expected, rel=1e-5)
    assert relation_kl(_t(T_V), _t(T_V), relation_heads=2).item() == pytest.approx(0.0, abs=1e-7)


def test_tinybert_attention_score_mse_by_hand():
    from kd.losses import attention_score_mse
    s, t = _dot_rows(S_Q, S_K, math.sqrt(2)), _dot_rows(T_Q, T_K, math.sqrt(2))
    expected = sum((s[i][j] - t[i][j]) ** 2 for i in range(2) for j in range(2)) / 4
    assert attention_score_mse(_t(S_Q), _t(S_K), _t(T_Q), _t(T_K), heads=1).item() == pytest.approx(expected, rel=1e-5)


def test_attention_terms_leave_padding_out():
    from kd.losses import attention_kl, attention_score_mse, relation_kl
    # token 1 is padding: key 1 gets no attention (each row attends to key 0 only, on both sides:
    # KL 0), and only the (0, 0) score counts in the MSE
    mask = torch.tensor([[True, False]])
    assert attention_kl(_t(S_Q), _t(S_K), _t(T_Q), _t(T_K), 1, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert relation_kl(_t(S_V), _t(T_V), 1, mask).item() == pytest.approx(0.0, abs=1e-7)
    s, t = _dot_rows(S_Q, S_K, math.sqrt(2)), _dot_rows(T_Q, T_K, math.sqrt(2))
    got = attention_score_mse(_t(S_Q), _t(S_K), _t(T_Q), _t(T_K), 1, mask).item()
    assert got == pytest.approx((s[0][0] - t[0][0]) ** 2, rel=1e-5)
