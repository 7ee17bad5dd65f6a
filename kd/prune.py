"""Structured pruning of a BERT teacher into a narrower, shallower student (Minitron's recipe).

1. Importance from activations on a few calibration batches of the training corpus, one forward
   of the teacher with hooks:
   - attention head: mean over tokens of the L2 norm of the head's context vector (its slice of the
     input of the attention output projection);
   - FFN neuron: mean over tokens of |GELU activation|;
   - hidden (embedding) channel: mean over tokens of |LayerNorm output|, summed over every
     LayerNorm (embeddings and both of each layer), since the residual stream is shared;
   - layer: block importance, 1 - mean cosine(layer input, layer output): a layer that barely
     changes the residual stream is the one to drop.
2. Keep the `num_layers` most important layers (in their order), the `num_heads` most important
   heads of each, the `intermediate_size` most important neurons of each, and the `hidden_size`
   most important channels everywhere; slice consistently:
   - a head's Q, K and V rows and its O columns together;
   - the kept channels in the embeddings, every LayerNorm, the residual projections, and the MLM
     head (transform and the tied decoder), so the residual stream keeps one channel order.
   LayerNorm then normalises over the kept channels only, an approximation at reduced width (exact
   when every channel is kept).
The ranking is returned as plain data and written to the run's log folder (prune_ranking.json).
"""
import json
import logging
import os
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM

from kd.errors import KDError

log = logging.getLogger(__name__)


def check_pruned_shape(student_cfg, teacher_config) -> Dict[str, int]:
    """The student's shape for a pruned init, or a one-line error naming the key and its range."""
    t = teacher_config
    head_dim = t.hidden_size // t.num_attention_heads
    hidden = student_cfg.hidden_size or t.hidden_size
    if not 0 < hidden <= t.hidden_size:
        raise KDError(f"student.hidden_size={hidden}: a pruned student keeps some of the teacher's channels, "
                      f"so it must be in [1, {t.hidden_size}]")
    heads = student_cfg.num_heads or hidden // head_dim
    if hidden % heads:
        raise KDError(f"student.hidden_size={hidden} does not divide into student.num_heads={heads}; "
                      f"pick a width that is a multiple of the head count")
    if heads > t.num_attention_heads:
        raise KDError(f"student.num_heads={heads}, but the teacher has {t.num_attention_heads} heads per layer; "
                      f"a pruned student keeps some of them: use 1..{t.num_attention_heads}")
    if hidden // heads != head_dim:
        raise KDError(f"student.hidden_size={hidden} with student.num_heads={heads} gives {hidden // heads}-dim heads, "
                      f"but pruning keeps whole teacher heads of {head_dim} dims: set student.num_heads="
                      f"{hidden // head_dim}" + ("" if hidden % head_dim == 0 else
                                                 f" and a width that is a multiple of {head_dim}"))
    ffn = student_cfg.intermediate_size or t.intermediate_size * hidden // t.hidden_size  # the teacher's ratio
    if not 0 < ffn <= t.intermediate_size:
        raise KDError(f"student.intermediate_size={ffn}: pruning keeps FFN neurons of the teacher, so it must be in "
                      f"[1, {t.intermediate_size}]")
    if not 0 < student_cfg.num_layers <= t.num_hidden_layers:
        raise KDError(f"student.num_layers={student_cfg.num_layers}: pruning keeps teacher layers, so it must be in "
                      f"[1, {t.num_hidden_layers}]")
    return {"num_layers": student_cfg.num_layers, "hidden_size": hidden, "num_heads": heads,
            "intermediate_size": ffn, "head_dim": head_dim}


@torch.no_grad()
def activation_importance(teacher: BertForMaskedLM, batches: Iterable[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Importance scores from one teacher forward per calibration batch of input ids (B, S):
    heads (L, H), ffn (L, F), hidden (D,), layers (L,). Full blocks, so no padding to mask."""
    cfg = teacher.config
    layers = teacher.bert.encoder.layer
    num_heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    sums = {"heads": torch.zeros(len(layers), num_heads), "ffn": torch.zeros(len(layers), cfg.intermediate_size),
            "hidden": torch.zeros(cfg.hidden_size), "layers": torch.zeros(len(layers))}
    tokens = [0]
    handles = []

    def per_token_mean(x: torch.Tensor) -> torch.Tensor:
        return x.float().reshape(-1, x.size(-1)).sum(0).cpu()

    for i, layer in enumerate(layers):
        def context_hook(_m, inputs, i=i):  # input of the attention output projection: (B, S, H*dh)
            ctx = inputs[0].float()
            norms = ctx.reshape(*ctx.shape[:-1], num_heads, head_dim).norm(dim=-1)  # (B, S, H)
            sums["heads"][i] += norms.reshape(-1, num_heads).sum(0).cpu()

        def ffn_hook(_m, _inputs, output, i=i):
            sums["ffn"][i] += per_token_mean(output.abs())

        def block_hook(_m, args, kwargs, output, i=i):  # hidden_states may come by position or by name
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            sums["layers"][i] += (1.0 - cos).sum().cpu()

        handles += [layer.attention.output.dense.register_forward_pre_hook(context_hook),
                    layer.intermediate.register_forward_hook(ffn_hook),
                    layer.register_forward_hook(block_hook, with_kwargs=True)]
    def norm_hook(_m, _inputs, output):  # returns None: a hook's return value would replace the output
        sums["hidden"].add_(per_token_mean(output.abs()))

    handles += [m.register_forward_hook(norm_hook) for m in teacher.bert.modules() if isinstance(m, nn.LayerNorm)]
    try:
        was_training = teacher.training
        teacher.eval()
        for input_ids in batches:
            input_ids = input_ids.to(next(teacher.parameters()).device)
            teacher.bert(input_ids=input_ids)
            tokens[0] += input_ids.numel()
        teacher.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    if not tokens[0]:
        raise KDError("pruning needs calibration batches, and none came: set student.prune_calibration_batches >= 1 "
                      "and check that the training split is not empty")
    return {k: v / tokens[0] for k, v in sums.items()}


def _top(scores: torch.Tensor, k: int) -> List[int]:
    """Indices of the k largest scores, in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def choose(importance: Dict[str, torch.Tensor], shape: Dict[str, int]) -> dict:
    """What to keep: layers, per kept layer its heads and neurons, and the hidden channels."""
    layers = _top(importance["layers"], shape["num_layers"])
    return {"layers": layers,
            "heads": {i: _top(importance["heads"][i], shape["num_heads"]) for i in layers},
            "ffn": {i: _top(importance["ffn"][i], shape["intermediate_size"]) for i in layers},
            "hidden": _top(importance["hidden"], shape["hidden_size"])}


def _slice_linear(target: nn.Linear, source: nn.Linear, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]):
    weight = source.weight
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    target.weight.data.copy_(weight)
    if source.bias is not None:
        target.bias.data.copy_(source.bias[rows] if rows is not None else source.bias)


def _slice_norm(target: nn.LayerNorm, source: nn.LayerNorm, channels: torch.Tensor):
    target.weight.data.copy_(source.weight[channels])
    target.bias.data.copy_(source.bias[channels])


@torch.no_grad()
def slice_teacher(teacher: BertForMaskedLM, student: BertForMaskedLM, keep: dict) -> None:
    """Copy the kept parts of the teacher into a student built with the pruned shape."""
    t_cfg = teacher.config
    head_dim = t_cfg.hidden_size // t_cfg.num_attention_heads
    ch = torch.tensor(keep["hidden"])
    t_emb, s_emb = teacher.bert.embeddings, student.bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        getattr(s_emb, name).weight.data.copy_(getattr(t_emb, name).weight[:, ch])
    _slice_norm(s_emb.LayerNorm, t_emb.LayerNorm, ch)
    for s_idx, t_idx in enumerate(keep["layers"]):
        t_layer, s_layer = teacher.bert.encoder.layer[t_idx], student.bert.encoder.layer[s_idx]
        # a head's rows of Q, K and V and its columns of O move together
        head_rows = torch.tensor([h * head_dim + d for h in keep["heads"][t_idx] for d in range(head_dim)])
        for name in ("query", "key", "value"):
            _slice_linear(getattr(s_layer.attention.self, name), getattr(t_layer.attention.self, name), head_rows, ch)
        _slice_linear(s_layer.attention.output.dense, t_layer.attention.output.dense, ch, head_rows)
        _slice_norm(s_layer.attention.output.LayerNorm, t_layer.attention.output.LayerNorm, ch)
        neurons = torch.tensor(keep["ffn"][t_idx])
        _slice_linear(s_layer.intermediate.dense, t_layer.intermediate.dense, neurons, ch)
        _slice_linear(s_layer.output.dense, t_layer.output.dense, ch, neurons)
        _slice_norm(s_layer.output.LayerNorm, t_layer.output.LayerNorm, ch)
    t_head, s_head = teacher.cls.predictions, student.cls.predictions
    _slice_linear(s_head.transform.dense, t_head.transform.dense, ch, ch)
    _slice_norm(s_head.transform.LayerNorm, t_head.transform.LayerNorm, ch)
    s_head.bias.data.copy_(t_head.bias)
    student.tie_weights()  # the decoder is the (sliced) word embedding matrix


def prune_into(teacher: BertForMaskedLM, student: BertForMaskedLM, shape: Dict[str, int],
               batches: Iterable[torch.Tensor]) -> dict:
    """Rank, choose and slice; returns the ranking (plain data for prune_ranking.json)."""
    importance = activation_importance(teacher, batches)
    keep = choose(importance, shape)
    slice_teacher(teacher, student, keep)
    log.info("pruned init: teacher layers %s, %d/%d heads, %d/%d FFN neurons, %d/%d channels",
             keep["layers"], shape["num_heads"], teacher.config.num_attention_heads, shape["intermediate_size"],
             teacher.config.intermediate_size, shape["hidden_size"], teacher.config.hidden_size)
    return {"shape": shape, "kept": {k: ({str(i): v for i, v in val.items()} if isinstance(val, dict) else val)
                                     for k, val in keep.items()},
            "importance": {k: v.tolist() for k, v in importance.items()},
            "method": "activation importance (Minitron): heads by context-vector L2 norm, FFN neurons by "
                      "|activation|, channels by |LayerNorm output| summed over LayerNorms, layers by "
                      "1 - cos(input, output); means over calibration tokens"}


def write_ranking(ranking: dict, log_dir: str) -> str:
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, "prune_ranking.json")
    with open(path, "w") as fh:
        json.dump(ranking, fh, indent=1)
    return path
