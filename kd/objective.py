"""The pretraining distillation objective: one batch -> weighted loss and unweighted named terms."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from kd import dist
from kd.losses import HIDDEN_LOSSES, combine_terms, kl_div_logits, mlm_cross_entropy, topk_kl
from kd.models import mlm_forward


@dataclass
class DistillPlan:
    """What the step computes, derived once from the config.

    use_teacher: a live teacher runs in the step; from_cache: kd_kl comes from the teacher's cached
    top-k rows in the batch (kd.teacher_cache), and there is no teacher forward."""
    use_teacher: bool
    hidden_pairs: List[Tuple[int, int]]
    weights: Dict[str, float]
    hidden_loss: str = "cosine"
    temperature: float = 2.0
    kd_positions: str = "masked"
    kd_direction: str = "forward"
    kd_loss_scale: Optional[float] = None
    from_cache: bool = False
    topk_mode: str = "renormalize"

    @property
    def hidden_prefix(self) -> str:
        return "hidden_mse" if self.hidden_loss == "mse" else "hidden_cos"

    def hidden_term(self, s_idx: int, t_idx: int) -> str:
        return f"{self.hidden_prefix}_{s_idx}_{t_idx}"


def make_plan(loss_cfg, hidden_pairs: List[Tuple[int, int]], from_cache: bool = False) -> DistillPlan:
    use_kd = loss_cfg.alpha_kd > 0
    # a cache holds no hidden states (config validation refuses alpha_hidden > 0 with one)
    pairs = list(hidden_pairs) if loss_cfg.alpha_hidden > 0 and not from_cache else []
    plan = DistillPlan(use_teacher=(use_kd or bool(pairs)) and not from_cache, hidden_pairs=pairs, weights={},
                       hidden_loss=loss_cfg.hidden_loss, temperature=loss_cfg.temperature,
                       kd_positions=loss_cfg.kd_positions, kd_direction=loss_cfg.kd_direction,
                       kd_loss_scale=loss_cfg.kd_loss_scale, from_cache=from_cache and use_kd,
                       topk_mode=loss_cfg.topk_mode)
    plan.weights["mlm_ce"] = loss_cfg.alpha_mlm
    if use_kd:
        plan.weights["kd_kl"] = loss_cfg.alpha_kd
    for s_idx, t_idx in pairs:  # the hidden weight is shared by the pairs (a mean over layers)
        plan.weights[plan.hidden_term(s_idx, t_idx)] = loss_cfg.alpha_hidden / len(pairs)
    return plan


def _masked_subset(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at every position (B, S, V) -> at the masked positions (B, k, V)."""
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))


def distill_terms(model: nn.Module, teacher: Optional[nn.Module], batch: dict, plan: DistillPlan):
    """Unweighted loss terms for one batch (full blocks: no attention mask, no padding).

    Returns (terms, student logits at the masked positions, teacher's there or None)."""
    input_ids, positions, labels = batch["input_ids"], batch["masked_positions"], batch["mlm_labels"]
    # With kd_positions=all the heads run everywhere, and the MLM term takes the masked subset.
    head_positions = positions if plan.kd_positions == "masked" else None
    s_logits, s_hidden = model(input_ids, head_positions)
    s_masked = s_logits if head_positions is not None else _masked_subset(s_logits, positions)
    terms = {"mlm_ce": mlm_cross_entropy(s_masked, labels)}
    t_masked = None
    if plan.use_teacher and teacher is not None:
        with torch.no_grad():  # not inference_mode: the KL saves teacher tensors for backward
            t_logits, t_hidden = mlm_forward(teacher, input_ids, head_positions,
                                             output_hidden_states=bool(plan.hidden_pairs))
        if "kd_kl" in plan.weights:
            terms["kd_kl"] = kl_div_logits(s_logits, t_logits, plan.temperature, plan.kd_direction)
        hidden_fn = HIDDEN_LOSSES[plan.hidden_loss]
        for (s_idx, t_idx), s_h in zip(plan.hidden_pairs, s_hidden):
            terms[plan.hidden_term(s_idx, t_idx)] = hidden_fn(s_h, t_hidden[t_idx])
        t_masked = t_logits if head_positions is not None else _masked_subset(t_logits, positions)
    elif plan.from_cache and "kd_kl" in plan.weights:  # rows looked up by block index in the collate
        terms["kd_kl"] = topk_kl(s_masked, batch["teacher_topk_ids"], batch["teacher_topk_logits"],
                                 batch["teacher_lse"], plan.topk_mode, plan.temperature, plan.kd_direction)
    return terms, s_masked, t_masked


def distill_loss(model, teacher, batch, plan: DistillPlan):
    terms, _, _ = distill_terms(model, teacher, batch, plan)
    return combine_terms(terms, plan.weights, plan.kd_loss_scale), terms


@torch.no_grad()
def evaluate_mlm(model: nn.Module, teacher: Optional[nn.Module], batches, plan: DistillPlan,
                 device: torch.device, autocast) -> Dict[str, float]:
    """Held-out masked-LM metrics on fixed (static-mask) batches, summed over ranks."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, ce, correct, agree, n
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            terms, s_masked, t_masked = distill_terms(model, teacher, batch, plan)
            loss = combine_terms(terms, plan.weights, plan.kd_loss_scale)
        predicted = s_masked.argmax(-1)
        n = batch["mlm_labels"].numel()
        sums[0] += loss.double() * n  # tensors: one host sync per evaluation, not per batch
        sums[1] += terms["mlm_ce"].double() * n
        sums[2] += (predicted == batch["mlm_labels"]).sum()
        if t_masked is not None:
            sums[3] += (predicted == t_masked.argmax(-1)).sum()
        elif "teacher_topk_ids" in batch:  # cached top-1 is the teacher's argmax
            sums[3] += (predicted == batch["teacher_topk_ids"][..., 0]).sum()
        sums[4] += n
    model.train()
    sums = dist.all_reduce_sum(sums)
    n = max(float(sums[4]), 1.0)
    metrics = {"eval/loss": float(sums[0]) / n, "eval/mlm_ce": float(sums[1]) / n,
               "eval/masked_accuracy": 100.0 * float(sums[2]) / n}
    metrics["eval/perplexity"] = float(torch.exp(torch.tensor(metrics["eval/mlm_ce"])))
    if (plan.use_teacher and teacher is not None) or plan.from_cache:
        metrics["eval/teacher_agreement"] = 100.0 * float(sums[3]) / n
    return metrics
