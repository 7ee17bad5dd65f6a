"""The pretraining distillation objective: one batch -> weighted loss and unweighted named terms."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kd import dist
from kd.config_checks import attention_alphas_on
from kd.errors import KDError
from kd.losses import (HIDDEN_LOSSES, attention_kl, attention_score_mse, combine_terms, kl_div_logits,
                       mlm_cross_entropy, relation_kl, topk_kl)
from kd.fused_head import decoder_ce_kl
from kd.models import DecoderInput, capture_qkv, default_hidden_map, mlm_forward


@dataclass(frozen=True)
class AttentionTerm:
    """One attention-based term between a student and a teacher encoder layer (0-based)."""
    kind: str               # attn_kl | attn_mse | relation_qq | relation_kk | relation_vv
    student_layer: int
    teacher_layer: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.student_layer}_{self.teacher_layer}"


def _layer(value: Optional[int], depth: int, key: str) -> int:
    layer = depth - 1 if value is None else value
    if not 0 <= layer < depth:
        raise KDError(f"loss.{key}={value} is out of range: the model has {depth} encoder layers, so use "
                      f"0..{depth - 1} (or null for the last)")
    return layer


def attention_terms_for(loss_cfg, teacher_config, student_config) -> List[AttentionTerm]:
    """The attention terms the config asks for, checked against both models' shapes."""
    terms: List[AttentionTerm] = []
    if not attention_alphas_on(loss_cfg):
        return terms
    if teacher_config is None:
        raise KDError("attention terms (loss.alpha_attn_kl / alpha_relation_kl / alpha_attn_mse) need a live "
                      "teacher: set teacher.name")
    n_s, n_t = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    h_s, h_t = student_config.num_attention_heads, teacher_config.num_attention_heads
    s_layer = _layer(loss_cfg.attn_student_layer, n_s, "attn_student_layer")
    t_layer = _layer(loss_cfg.attn_teacher_layer, n_t, "attn_teacher_layer")
    for key in ("alpha_attn_kl", "alpha_attn_mse"):
        if getattr(loss_cfg, key) > 0 and h_s != h_t:
            raise KDError(f"loss.{key} compares attention head by head, so the student needs the teacher's "
                          f"{h_t} heads (it has {h_s}); loss.alpha_relation_kl (MiniLM v2) works with any head count")
    if loss_cfg.alpha_attn_kl > 0:
        terms.append(AttentionTerm("attn_kl", s_layer, t_layer))
    if loss_cfg.alpha_relation_kl > 0:
        r = loss_cfg.relation_heads
        if r < 1 or student_config.hidden_size % r or teacher_config.hidden_size % r:
            raise KDError(f"loss.relation_heads={r} must divide both widths (student {student_config.hidden_size}, "
                          f"teacher {teacher_config.hidden_size})")
        terms += [AttentionTerm(kind, s_layer, t_layer) for kind in ("relation_qq", "relation_kk", "relation_vv")]
    if loss_cfg.alpha_attn_mse > 0:  # TinyBERT: every layer of the uniform map (hidden_states index - 1)
        pairs = [tuple(p) for p in loss_cfg.hidden_layer_map] if loss_cfg.hidden_layer_map else \
            default_hidden_map(n_t, n_s, include_embeddings=False)
        terms += [AttentionTerm("attn_mse", s - 1, t - 1) for s, t in pairs if s >= 1 and t >= 1]
    return terms


def attention_term(term: AttentionTerm, s_qkv: dict, t_qkv: dict, plan: "DistillPlan") -> torch.Tensor:
    (s_q, s_k, s_v), (t_q, t_k, t_v) = s_qkv[term.student_layer], t_qkv[term.teacher_layer]
    if term.kind == "attn_kl":
        return attention_kl(s_q, s_k, t_q, t_k, plan.attention_heads)
    if term.kind == "attn_mse":
        return attention_score_mse(s_q, s_k, t_q, t_k, plan.attention_heads)
    s_x, t_x = {"relation_qq": (s_q, t_q), "relation_kk": (s_k, t_k), "relation_vv": (s_v, t_v)}[term.kind]
    return relation_kl(s_x, t_x, plan.relation_heads)


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
    attention_terms: List[AttentionTerm] = field(default_factory=list)
    attention_heads: int = 0            # heads of both models, for the head-by-head terms
    relation_heads: int = 16

    @property
    def student_attention_layers(self) -> List[int]:
        return sorted({t.student_layer for t in self.attention_terms})

    @property
    def teacher_attention_layers(self) -> List[int]:
        return sorted({t.teacher_layer for t in self.attention_terms})

    @property
    def hidden_prefix(self) -> str:
        return "hidden_mse" if self.hidden_loss == "mse" else "hidden_cos"

    def hidden_term(self, s_idx: int, t_idx: int) -> str:
        return f"{self.hidden_prefix}_{s_idx}_{t_idx}"


def make_plan(loss_cfg, hidden_pairs: List[Tuple[int, int]], from_cache: bool = False,
              attention_terms: Sequence[AttentionTerm] = (), attention_heads: int = 0) -> DistillPlan:
    use_kd = loss_cfg.alpha_kd > 0
    # a cache holds no hidden states or attention (config validation refuses those terms with one)
    pairs = list(hidden_pairs) if loss_cfg.alpha_hidden > 0 and not from_cache else []
    attention = list(attention_terms) if not from_cache else []
    plan = DistillPlan(use_teacher=(use_kd or bool(pairs) or bool(attention)) and not from_cache, hidden_pairs=pairs,
                       weights={}, hidden_loss=loss_cfg.hidden_loss, temperature=loss_cfg.temperature,
                       kd_positions=loss_cfg.kd_positions, kd_direction=loss_cfg.kd_direction,
                       kd_loss_scale=loss_cfg.kd_loss_scale, from_cache=from_cache and use_kd,
                       topk_mode=loss_cfg.topk_mode, attention_terms=attention, attention_heads=attention_heads,
                       relation_heads=loss_cfg.relation_heads)
    plan.weights["mlm_ce"] = loss_cfg.alpha_mlm
    if use_kd:
        plan.weights["kd_kl"] = loss_cfg.alpha_kd
    for s_idx, t_idx in pairs:  # the hidden weight is shared by the pairs (a mean over layers)
        plan.weights[plan.hidden_term(s_idx, t_idx)] = loss_cfg.alpha_hidden / len(pairs)
    mse_terms = [t for t in attention if t.kind == "attn_mse"]
    for term in attention:  # MiniLM v2 sums its three relations; TinyBERT's MSE is a mean over layers
        weight = {"attn_kl": loss_cfg.alpha_attn_kl, "attn_mse": loss_cfg.alpha_attn_mse / max(1, len(mse_terms))}
        plan.weights[term.name] = weight.get(term.kind, loss_cfg.alpha_relation_kl)
    return plan


def _masked_subset(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at every position (B, S, V) -> at the masked positions (B, k, V)."""
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))


def _fused_logit_terms(s_out: DecoderInput, t_out: Optional[DecoderInput], positions: Optional[torch.Tensor],
                       labels: torch.Tensor, plan: DistillPlan) -> Dict[str, torch.Tensor]:
    """mlm_ce (and kd_kl with a teacher) from the decoder inputs, chunked (kd.fused_head)."""
    teacher = (t_out.hidden, t_out.weight, t_out.bias) if t_out is not None else (None,) * 3
    ce, kl = decoder_ce_kl(s_out.hidden, s_out.weight, s_out.bias, positions, labels, *teacher,
                           temperature=plan.temperature, direction=plan.kd_direction)
    return {"mlm_ce": ce, **({"kd_kl": kl} if kl is not None else {})}


def distill_terms(model: nn.Module, teacher: Optional[nn.Module], batch: dict, plan: DistillPlan,
                  need_logits: bool = True):
    """Unweighted loss terms for one batch (full blocks: no attention mask, no padding).

    Returns (terms, student logits at the masked positions, teacher's there or None). Without
    need_logits (training), MLM CE and logit KL come from kd.fused_head, which never materialises
    the logits, and no logits are returned."""
    input_ids, positions, labels = batch["input_ids"], batch["masked_positions"], batch["mlm_labels"]
    # With kd_positions=all the heads run everywhere, and the MLM term takes the masked subset.
    head_positions = positions if plan.kd_positions == "masked" else None
    fused = not need_logits and not plan.from_cache
    s_out, s_hidden, s_qkv = model(input_ids, head_positions, decoder_input=fused)
    t_out = None
    if plan.use_teacher and teacher is not None:
        # not inference_mode: the KL saves teacher tensors for backward
        with torch.no_grad(), capture_qkv(teacher, plan.teacher_attention_layers) as t_qkv:
            t_out, t_hidden = mlm_forward(teacher, input_ids, head_positions,
                                          output_hidden_states=bool(plan.hidden_pairs), decoder_input=fused)
    live_kl = "kd_kl" in plan.weights and t_out is not None
    s_masked = t_masked = None
    if fused:
        # with the head at the masked positions only, every decoder row is an MLM row
        terms = _fused_logit_terms(s_out, t_out if live_kl else None,
                                   None if head_positions is not None else positions, labels, plan)
    else:
        s_masked = s_out if head_positions is not None else _masked_subset(s_out, positions)
        terms = {"mlm_ce": mlm_cross_entropy(s_masked, labels)}
        if live_kl:
            terms["kd_kl"] = kl_div_logits(s_out, t_out, plan.temperature, plan.kd_direction)
        elif plan.from_cache and "kd_kl" in plan.weights:  # rows looked up by block index in the collate
            terms["kd_kl"] = topk_kl(s_masked, batch["teacher_topk_ids"], batch["teacher_topk_logits"],
                                     batch["teacher_lse"], plan.topk_mode, plan.temperature, plan.kd_direction)
        if t_out is not None:
            t_masked = t_out if head_positions is not None else _masked_subset(t_out, positions)
    if t_out is not None:
        hidden_fn = HIDDEN_LOSSES[plan.hidden_loss]
        for (s_idx, t_idx), s_h in zip(plan.hidden_pairs, s_hidden):
            terms[plan.hidden_term(s_idx, t_idx)] = hidden_fn(s_h, t_hidden[t_idx])
        for term in plan.attention_terms:
            terms[term.name] = attention_term(term, s_qkv, t_qkv, plan)
    return terms, s_masked, t_masked


def distill_loss(model, teacher, batch, plan: DistillPlan, fused: bool = True):
    """(weighted loss, unweighted terms) of one training batch. fused=False takes the plain path
    (full logits, then kd.losses), the one evaluation uses; the bench times the two."""
    terms, _, _ = distill_terms(model, teacher, batch, plan, need_logits=not fused)
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
