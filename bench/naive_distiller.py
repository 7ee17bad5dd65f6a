"""The naive reference step: distillation the way DistilBERT's distiller sets it up.

This is the baseline that bench/distill_throughput.py measures kd's fast path against, and the
reference that tests/test_fast_path.py checks the fast path's numbers against. Written for this
project; it follows the published recipe, not anyone's code:

- plain `BertForMaskedLM(input_ids, attention_mask=...)` forwards with eager attention, so both
  models produce full-vocabulary logits at every position, (batch, seq, vocab);
- MLM cross-entropy over the whole (B*S, V) tensor, with label -100 at the unmasked positions;
- `T^2 * KL(teacher || student)` over every non-pad position, selected with `masked_select` on
  the (B, S, V) logits, averaged over the selected positions ("batchmean");
- `1 - cos` between the last hidden states at the non-pad positions;
- the teacher in fp32, under fp16 autocast (with a loss scaler) on CUDA, as DistilBERT's apex O1;
- AdamW (not fused) with gradient clipping.

It does not take shortcuts on purpose: that is the point of a baseline.
"""
import contextlib
import copy
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

IGNORE_INDEX = -100


@dataclass
class NaiveWeights:
    """DistilBERT's names for kd's weights: alpha_ce <- alpha_kd, alpha_cos <- alpha_hidden."""
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0

    @classmethod
    def from_loss_config(cls, loss_cfg) -> "NaiveWeights":
        return cls(alpha_ce=loss_cfg.alpha_kd, alpha_mlm=loss_cfg.alpha_mlm,
                   alpha_cos=loss_cfg.alpha_hidden, temperature=loss_cfg.temperature)


def eager_copy(model: BertForMaskedLM, dtype: torch.dtype = torch.float32) -> BertForMaskedLM:
    """The same weights in a model that uses the eager (matmul + softmax) attention."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"
    config.dtype = dtype
    twin = BertForMaskedLM(config)
    twin.load_state_dict(model.state_dict())
    twin.tie_weights()
    return twin.to(dtype)


def full_mlm_labels(input_ids: torch.Tensor, masked_positions: torch.Tensor,
                    mlm_labels: torch.Tensor) -> torch.Tensor:
    """(B, k) positions and labels -> (B, S) labels with IGNORE_INDEX where nothing is predicted."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    return labels.scatter(1, masked_positions, mlm_labels)


def naive_distill_loss(student: BertForMaskedLM, teacher: BertForMaskedLM, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, lm_labels: torch.Tensor,
                       weights: NaiveWeights) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Weighted loss and the unweighted terms (named as kd names them) for one batch."""
    s_out = student(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    s_logits, t_logits = s_out.logits, t_out.logits  # (B, S, V) each
    vocab = s_logits.size(-1)

    keep = attention_mask.bool().unsqueeze(-1)  # (B, S, 1): the non-pad positions
    s_kept = torch.masked_select(s_logits, keep.expand_as(s_logits)).view(-1, vocab)
    t_kept = torch.masked_select(t_logits, keep.expand_as(t_logits)).view(-1, vocab)
    temp = weights.temperature
    kd_kl = F.kl_div(F.log_softmax(s_kept.float() / temp, dim=-1), F.softmax(t_kept.float() / temp, dim=-1),
                     reduction="batchmean") * temp ** 2

    mlm_ce = F.cross_entropy(s_logits.float().view(-1, vocab), lm_labels.view(-1), ignore_index=IGNORE_INDEX)

    s_last, t_last = s_out.hidden_states[-1], t_out.hidden_states[-1]
    width = s_last.size(-1)
    s_h = torch.masked_select(s_last, keep.expand_as(s_last)).view(-1, width)
    t_h = torch.masked_select(t_last, keep.expand_as(t_last)).view(-1, width)
    hidden_cos = (1.0 - F.cosine_similarity(s_h.float(), t_h.float(), dim=-1)).mean()

    loss = weights.alpha_ce * kd_kl + weights.alpha_mlm * mlm_ce + weights.alpha_cos * hidden_cos
    return loss, {"mlm_ce": mlm_ce, "kd_kl": kd_kl, "hidden_cos": hidden_cos}


class NaiveDistiller:
    """One complete training step of the naive recipe: forwards, losses, backward, clip, AdamW."""

    def __init__(self, student: BertForMaskedLM, teacher: BertForMaskedLM, weights: NaiveWeights,
                 device: torch.device, lr: float = 1e-4, weight_decay: float = 0.01, clip: float = 1.0):
        self.student, self.teacher, self.weights, self.device, self.clip = student, teacher, weights, device, clip
        self.teacher.eval().requires_grad_(False)
        self.student.train()
        decay = [p for p in student.parameters() if p.ndim >= 2]
        no_decay = [p for p in student.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-6)
        on_cuda = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if on_cuda else None
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if on_cuda else contextlib.nullcontext

    def step(self, batch: dict) -> torch.Tensor:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:  # kd's blocks are full; the naive recipe still masks pads
            attention_mask = torch.ones_like(input_ids)
        lm_labels = full_mlm_labels(input_ids, batch["masked_positions"], batch["mlm_labels"])
        with self.autocast():
            loss, _ = naive_distill_loss(self.student, self.teacher, input_ids, attention_mask,
                                         lm_labels, self.weights)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
