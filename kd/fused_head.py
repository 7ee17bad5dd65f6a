"""The MLM decoder and its two losses (CE and logit KD) fused, chunk by chunk over positions.

The plain step materialises full-vocabulary logits for student and teacher, then several more
(positions x vocab) tensors: log-softmaxes, probabilities, their difference, and in backward a
scatter of the CE gradient into a zero (B, S, V) tensor. With KL at every position (DistilBERT's
math) those passes over ~0.5 GB tensors are about half of a CPU step. Here the decoder matmul, both
losses and their gradients run on a few hundred positions at a time, so no (positions x vocab)
tensor outlives its chunk:

- forward computes each term's value and, at once, its gradient with respect to the decoder input,
  weight and bias (the gradient of a softmax loss needs the same probabilities as its value);
- backward only scales those stored gradients by the incoming ones and adds the two terms, so the
  terms stay separate (they are logged unweighted and `loss.kd_loss_scale` rebalances them).

Same definitions as kd.losses: `mlm_cross_entropy` (mean over the predicted rows) and
`kl_div_logits` (T^2 * KL, forward or reverse, mean over the KL rows). Stored: two gradients of
the decoder weight (vocab x width each) and of the decoder input; nothing of size positions x vocab.
"""
from typing import Optional, Tuple

import torch

# Elements of one chunk's (rows x vocab) logits: ~32 MB in fp32 keeps a chunk's passes near the CPU's
# caches; on a GPU larger chunks keep the matmuls big.
CHUNK_ELEMENTS = {"cpu": 8 * 2 ** 20, "cuda": 256 * 2 ** 20}


def _chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // vocab)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) without materialising the product (a batched (1 x V) @ (V x 1))."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _kl_and_grad(s_soft: torch.Tensor, t_soft: torch.Tensor, temperature: float, direction: str,
                 scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """From the softened logits (logits / T) of one chunk: the per-row KL, and the gradient of
    scale * T^2 * KL with respect to the student's logits."""
    logp_s = torch.log_softmax(s_soft, -1)
    logp_t = torch.log_softmax(t_soft, -1)
    if direction == "forward":  # KL(t || s); d/dz_s = p_s - p_t
        p_t = logp_t.exp()
        # the difference first, then one dot: two separate dots (each about -log V) would cancel
        per_row = _row_dot(p_t, logp_t.sub_(logp_s))
        grad = logp_s.exp_().sub_(p_t)
    elif direction == "reverse":  # KL(s || t); d/dz_s = p_s * (log p_s - log p_t - KL)
        p_s = logp_s.exp()
        log_ratio = logp_s.sub_(logp_t)
        per_row = _row_dot(p_s, log_ratio)
        grad = log_ratio.sub_(per_row.unsqueeze(-1)).mul_(p_s)
    else:
        raise ValueError(f"direction must be forward or reverse, got {direction!r}")
    return per_row, grad.mul_(scale * temperature)  # T^2 * dKL/dz * dz/dlogits (1/T)


class _DecoderKLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, positions, labels, temperature, direction):
        blocks, per_block, width = hidden.shape
        rows = blocks * per_block
        w = weight.to(hidden.dtype)  # under autocast the decoder input is bf16; the master weight is fp32
        hidden, labels = hidden.reshape(rows, width), labels.reshape(-1)
        with_kl = t_hidden is not None
        grads = {term: (torch.zeros(rows, width, dtype=torch.float32, device=hidden.device),
                        torch.zeros_like(weight, dtype=torch.float32), torch.zeros_like(bias, dtype=torch.float32))
                 for term in (("ce", "kl") if with_kl else ("ce",))}
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # chunks of whole blocks: each holds a known number of MLM rows, so no host sync finds them
        group = max(1, _chunk_rows(weight.size(0), hidden.device) // per_block)
        for b0 in range(0, blocks, group):
            b1 = min(b0 + group, blocks)
            chunk = slice(b0 * per_block, b1 * per_block)
            h = hidden[chunk]
            # logits / T straight from the matmul (scaling h and b, not the rows x vocab logits)
            soft = torch.addmm(bias.to(h.dtype) / temperature, h / temperature, w.t()).float() if with_kl else None
            # the MLM rows of the chunk (chunk-local): CE = logsumexp - the label's logit
            local = (positions[b0:b1] + per_block * torch.arange(b1 - b0, device=h.device).unsqueeze(1)).flatten()
            target = labels[b0 * positions.size(1):b1 * positions.size(1)]
            sub = (soft.index_select(0, local) * temperature if with_kl
                   else torch.addmm(bias.to(h.dtype), h.index_select(0, local), w.t()).float())
            ce_sum += (torch.logsumexp(sub, -1) - sub.gather(1, target.unsqueeze(1)).squeeze(1)).sum()
            g = torch.softmax(sub, -1)
            g.scatter_add_(1, target.unsqueeze(1), torch.full_like(g[:, :1], -1.0)).div_(labels.numel())
            _accumulate(grads["ce"], g, h.index_select(0, local), w, local + chunk.start)
            if with_kl:
                t_h = t_hidden.reshape(rows, -1)[chunk]
                t_soft = torch.addmm(t_bias.to(t_h.dtype) / temperature, t_h / temperature, t_weight.t()).float()
                per_row, logit_grad = _kl_and_grad(soft, t_soft, temperature, direction, 1.0 / rows)
                kl_sum += per_row.sum()
                _accumulate(grads["kl"], logit_grad, h, w, chunk)
        ctx.grads = grads
        ctx.shapes = (hidden.dtype, weight.dtype, bias.dtype, (blocks, per_block, width))
        return ce_sum / labels.numel(), temperature ** 2 * kl_sum / rows

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        total = [grad_ce * g for g in ctx.grads["ce"]]
        if "kl" in ctx.grads:
            total = [a + grad_kl * g for a, g in zip(total, ctx.grads["kl"])]
        ctx.grads = None
        h_dtype, w_dtype, b_dtype, shape = ctx.shapes
        return (total[0].to(h_dtype).reshape(shape), total[1].to(w_dtype), total[2].to(b_dtype),
                None, None, None, None, None, None, None)


def _accumulate(grads, logit_grad: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rows) -> None:
    """Chain a chunk's logit gradient through logits = h @ w.T + b into the stored gradients;
    `rows` (a slice or an index tensor) are the chunk's rows of the decoder input."""
    h_grad, w_grad, b_grad = grads
    g = logit_grad.to(h.dtype)
    if isinstance(rows, slice):
        h_grad[rows] += (g @ w).float()
    else:
        h_grad.index_add_(0, rows, (g @ w).float())
    w_grad.addmm_(g.t().float(), h.float())
    b_grad.add_(logit_grad.sum(0))


def decoder_ce_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, positions: Optional[torch.Tensor],
                  labels: torch.Tensor, t_hidden: Optional[torch.Tensor] = None,
                  t_weight: Optional[torch.Tensor] = None, t_bias: Optional[torch.Tensor] = None,
                  temperature: float = 1.0, direction: str = "forward") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(MLM CE at `positions`, T^2 * KL over every row or None without a teacher) of the decoder
    logits `hidden @ weight.T + bias` against `labels` and the teacher's `t_hidden @ t_weight.T + t_bias`.

    hidden: (blocks, rows per block, width), the decoder input (the MLM head's transform output);
    positions: (blocks, k), the rows of each block that are predicted, or None when every row is
    (the head already gathered at the masked positions); labels: (blocks, k) or (blocks, rows), their
    token ids. The teacher's tensors take no gradient."""
    if positions is None:
        positions = torch.arange(hidden.size(1), device=hidden.device).expand(hidden.size(0), -1)
    if t_hidden is not None:
        t_hidden, t_weight, t_bias = t_hidden.detach(), t_weight.detach(), t_bias.detach()
    ce, kl = _DecoderKLCE.apply(hidden, weight, bias, t_hidden, t_weight, t_bias, positions, labels,
                                temperature, direction)
    return ce, (kl if t_hidden is not None else None)
