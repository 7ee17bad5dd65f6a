"""Distillation losses as pure functions of (student, teacher, mask=None).

Every function returns a scalar averaged over the positions it is given. Choices (DESIGN §2):
- logit KD is `T^2 * KL`, as DistilBERT does, so gradients keep their scale across temperatures;
- forward KL is KL(teacher || student) (mean-seeking), reverse is KL(student || teacher);
- hidden-state losses ignore padding through the attention mask;
- from an offline teacher cache, `topk_kl` compares against the teacher's top-k only (renormalised
  over the k ids, or with the teacher's tail mass as a (k+1)-th bucket).
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F


def _masked_mean(per_item: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return per_item.mean()
    mask = mask.to(per_item.dtype)
    return (per_item * mask).sum() / mask.sum().clamp_min(1.0)


def kl_div_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  direction: str = "forward", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL between temperature-softened distributions over the last dim, mean over positions."""
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _scaled_kl(s_logp, t_logp, temperature, direction, mask)


def _scaled_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, temperature: float, direction: str,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
    """T^2 * KL from log-probabilities over the last dim, mean over (unmasked) positions."""
    if direction == "forward":
        per_position = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    elif direction == "reverse":
        per_position = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    else:
        raise ValueError(f"direction must be forward or reverse, got {direction!r}")
    return temperature ** 2 * _masked_mean(per_position, mask)


def mlm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the predicted positions; logits (..., V), labels (...)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error per token (averaged over features), mean over unmasked tokens."""
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)
    return _masked_mean(per_token, mask)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - cosine similarity per token, mean over unmasked tokens (DistilBERT's cosine loss)."""
    per_token = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return _masked_mean(per_token, mask)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}


def combine_terms(terms: Dict[str, torch.Tensor], weights: Dict[str, float],
                  kd_loss_scale: Optional[float] = None, lm_term: str = "mlm_ce") -> torch.Tensor:
    """Weighted sum of named terms.

    With `kd_loss_scale` set (ModelOpt's balancer), the KD terms together are rescaled to
    `kd_loss_scale` times the LM loss magnitude; the scale factor is a detached ratio, so it steers
    magnitudes without sending gradient through the ratio itself.
    """
    total = terms[lm_term] * weights[lm_term] if lm_term in terms else 0.0
    kd = sum(terms[name] * weights[name] for name in terms if name != lm_term)
    if kd_loss_scale is not None and torch.is_tensor(kd) and lm_term in terms:
        ratio = (terms[lm_term].detach() * weights[lm_term]) / kd.detach().clamp_min(1e-8)
        kd = kd * (kd_loss_scale * ratio)
    return total + kd


# Floor on the teacher's tail mass in lse_tail mode. The cached log-probs are fp16, so the top-k
# mass is known to ~1e-6 at best; a smaller (or rounding-negative) tail is indistinguishable from 0.
TAIL_FLOOR = 1e-6


def topk_kl(student_logits: torch.Tensor, teacher_topk_ids: torch.Tensor, teacher_topk_logits: torch.Tensor,
            teacher_lse: Optional[torch.Tensor] = None, mode: str = "renormalize", temperature: float = 1.0,
            direction: str = "forward", mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL against a teacher known only by its top-k logits (an offline teacher cache).

    student_logits (..., V): the student's full-vocabulary logits at the positions the teacher rows
    describe; teacher_topk_ids / teacher_topk_logits (..., k): the teacher's k largest logits
    (untempered); teacher_lse (...): logsumexp over the full vocabulary of teacher_logits / T.

    mode="renormalize" (NeMo-Aligner): both distributions are renormalised over the teacher's k ids
    and the rest of the vocabulary is ignored. Exact at any temperature.
    mode="lse_tail": k + 1 buckets, the k ids and "everything else". The teacher's tail mass is
    1 - sum of its top-k probabilities (known through teacher_lse), the student's is its own mass
    outside the same k ids; with k = V this is kl_div_logits. teacher_lse must be taken at the
    same temperature.
    """
    ids = teacher_topk_ids.long()
    s_scaled = student_logits.float() / temperature
    s_topk = s_scaled.gather(-1, ids)
    t_topk = teacher_topk_logits.float() / temperature
    if mode == "renormalize":
        s_logp = F.log_softmax(s_topk, dim=-1)
        t_logp = F.log_softmax(t_topk, dim=-1)
    elif mode == "lse_tail":
        if teacher_lse is None:
            raise ValueError("topk_kl(mode='lse_tail') needs teacher_lse")
        s_lse = s_scaled.logsumexp(-1, keepdim=True)
        s_tail = s_scaled.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
        s_logp = torch.cat([s_topk, s_tail], -1) - s_lse
        t_head = t_topk - teacher_lse.float().unsqueeze(-1)
        head_mass = t_head.logsumexp(-1, keepdim=True).clamp_max(0.0)
        t_tail = torch.log((-torch.expm1(head_mass)).clamp_min(TAIL_FLOOR))
        t_logp = torch.cat([t_head, t_tail], -1)
        t_logp = t_logp - t_logp.logsumexp(-1, keepdim=True)  # absorbs the rounding of stored values
    else:
        raise ValueError(f"mode must be renormalize or lse_tail, got {mode!r}")
    return _scaled_kl(s_logp, t_logp, temperature, direction, mask)


# ---- attention-based terms (MiniLM v1/v2, TinyBERT) --------------------------------------------
# Inputs are the query / key / value projections of one layer, (B, S, width), as the layer computed
# them (kd.models.capture_qkv); `mask` (B, S) marks real tokens: padded keys get no attention and
# padded query rows are left out of the mean.

def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, W) -> (B, heads, S, W / heads)."""
    b, s, w = x.shape
    if w % heads:
        raise ValueError(f"width {w} does not split into {heads} heads")
    return x.float().reshape(b, s, heads, w // heads).transpose(1, 2)


def _scores(a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot products per head, (B, heads, S, S)."""
    a_h, b_h = _heads(a, heads), _heads(b, heads)
    return a_h @ b_h.transpose(-1, -2) / math.sqrt(a_h.size(-1))


def _row_log_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    return F.log_softmax(scores, dim=-1)


def _rows_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """KL(teacher || student) per (head, query row), mean over heads and real query rows."""
    t_p = t_logp.exp()
    # padded keys have probability 0 on both sides: they contribute 0 (not 0 * (-inf + inf))
    per_key = torch.where(t_p > 0, t_p * (t_logp - s_logp), torch.zeros_like(t_p))
    per_row = per_key.sum(-1).mean(1)  # (B, S): summed over keys, averaged over heads
    return _masked_mean(per_row, mask)


def attention_kl(s_q: torch.Tensor, s_k: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor, heads: int,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiniLM v1: KL(teacher || student) between the self-attention distributions softmax(QK^T/sqrt(d))
    of one layer each, head by head (both models have `heads` heads; head widths may differ)."""
    return _rows_kl(_row_log_softmax(_scores(s_q, s_k, heads), mask),
                    _row_log_softmax(_scores(t_q, t_k, heads), mask), mask)


def relation_kl(s_x: torch.Tensor, t_x: torch.Tensor, relation_heads: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiniLM v2 self-relation: split queries (or keys, or values) into `relation_heads` heads,
    relation = softmax(x_r x_r^T / sqrt(d_r)), KL(teacher || student) per head and row. The
    relations are S x S whatever the widths, so the student needs no projection."""
    return _rows_kl(_row_log_softmax(_scores(s_x, s_x, relation_heads), mask),
                    _row_log_softmax(_scores(t_x, t_x, relation_heads), mask), mask)


def attention_score_mse(s_q: torch.Tensor, s_k: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor, heads: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TinyBERT: MSE between the attention scores QK^T/sqrt(d) (before the softmax), head by head,
    mean over heads and the (query, key) pairs of real tokens."""
    sq_err = (_scores(s_q, s_k, heads) - _scores(t_q, t_k, heads)).pow(2).mean(1)  # (B, S, S)
    if mask is None:
        return sq_err.mean()
    pairs = mask.bool()[:, :, None] & mask.bool()[:, None, :]
    return _masked_mean(sq_err, pairs)
