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
