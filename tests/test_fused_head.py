"""kd.fused_head gives the plain path's values and gradients (decoder logits, then kd.losses), in
chunks small enough that every chunk boundary case occurs."""
import pytest
import torch

from kd import fused_head
from kd.fused_head import decoder_ce_kl
from kd.losses import kl_div_logits, mlm_cross_entropy

BLOCKS, PER_BLOCK, WIDTH, VOCAB = 5, 7, 8, 50


@pytest.fixture
def small_chunks(monkeypatch):
    """Two blocks per chunk: 3 chunks, the last one short."""
    monkeypatch.setitem(fused_head.CHUNK_ELEMENTS, "cpu", 2 * PER_BLOCK * VOCAB + 3)


def tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BLOCKS, PER_BLOCK, WIDTH, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, generator=gen).requires_grad_()
    bias = (0.1 * torch.randn(VOCAB, generator=gen)).requires_grad_()
    teacher = (torch.randn(BLOCKS, PER_BLOCK, WIDTH, generator=gen), torch.randn(VOCAB, WIDTH, generator=gen),
               torch.randn(VOCAB, generator=gen))
    positions = torch.stack([torch.randperm(PER_BLOCK, generator=gen)[:2].sort().values for _ in range(BLOCKS)])
    labels = torch.randint(0, VOCAB, positions.shape, generator=gen)
    return hidden, weight, bias, teacher, positions, labels


def at(logits, positions):
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))


def grads_of(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_fused_terms_and_gradients_equal_the_plain_path(small_chunks, direction):
    hidden, weight, bias, (t_h, t_w, t_b), positions, labels = tensors()
    params = (hidden, weight, bias)
    logits = hidden @ weight.t() + bias
    plain_ce = mlm_cross_entropy(at(logits, positions), labels)
    plain_kl = kl_div_logits(logits, t_h @ t_w.t() + t_b, temperature=2.0, direction=direction)
    ce, kl = decoder_ce_kl(hidden, weight, bias, positions, labels, t_h, t_w, t_b, temperature=2.0, direction=direction)
    torch.testing.assert_close(ce, plain_ce)
    torch.testing.assert_close(kl, plain_kl)
    assert kl.item() > 0.1  # the two distributions differ: a real test of the KL gradient
    # different weights on the two terms: each term's stored gradient is scaled by its own
    for got, want in zip(grads_of(2.0 * ce + 5.0 * kl, params), grads_of(2.0 * plain_ce + 5.0 * plain_kl, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cross_entropy_alone_without_a_teacher(small_chunks):
    hidden, weight, bias, _, positions, labels = tensors(1)
    ce, kl = decoder_ce_kl(hidden, weight, bias, positions, labels)
    assert kl is None
    plain = mlm_cross_entropy(at(hidden @ weight.t() + bias, positions), labels)
    torch.testing.assert_close(ce, plain)
    for got, want in zip(grads_of(ce, (hidden, weight, bias)), grads_of(plain, (hidden, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_bad_direction_is_refused(small_chunks):
    hidden, weight, bias, (t_h, t_w, t_b), positions, labels = tensors(2)
    t_w.requires_grad_()
    ce, kl = decoder_ce_kl(hidden, weight, bias, positions, labels, t_h, t_w, t_b, temperature=1.0)
    (ce + kl).backward()
    assert t_w.grad is None and weight.grad is not None
    every_row = decoder_ce_kl(hidden, weight, bias, None, torch.zeros(BLOCKS, PER_BLOCK, dtype=torch.long))[0]
    torch.testing.assert_close(every_row, mlm_cross_entropy(hidden @ weight.t() + bias,
                                                            torch.zeros(BLOCKS, PER_BLOCK, dtype=torch.long)))
    with pytest.raises(ValueError, match="forward or reverse"):
        decoder_ce_kl(hidden, weight, bias, positions, labels, t_h, t_w.detach(), t_b, direction="sideways")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_a_small_kl_between_near_twins_keeps_its_digits(direction):
    """A student close to its teacher has a KL far below the entropies; summing p*log p and p*log q
    apart would cancel them and lose the digits (seen at real vocab size: 1e-3 relative error)."""
    gen = torch.Generator().manual_seed(3)
    vocab = 30522
    hidden = torch.randn(2, 3, 16, generator=gen)
    weight = torch.randn(vocab, 16, generator=gen)
    bias = torch.zeros(vocab)
    t_hidden = hidden + 0.01 * torch.randn(hidden.shape, generator=gen)
    positions = torch.tensor([[0], [2]])
    labels = torch.tensor([[5], [7]])
    _, kl = decoder_ce_kl(hidden, weight, bias, positions, labels, t_hidden, weight, bias, 2.0, direction)
    plain = kl_div_logits(hidden @ weight.t(), t_hidden @ weight.t(), temperature=2.0, direction=direction)
    assert 0 < plain.item() < 0.05
    torch.testing.assert_close(kl, plain, rtol=1e-4, atol=0)
