"""Teacher loading, student construction and initialisation, and the gathered-head MLM forward."""
import contextlib
import copy
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from kd.assets import resolve_model_ref
from kd.errors import KDError
from kd.hub import hub_error, prepare_hub_access

log = logging.getLogger(__name__)

# Keys of a BertForMaskedLM that only a checkpoint with a trained MLM head has. The decoder weight
# is tied to the word embeddings, so it is never missing; these are.
MLM_HEAD_KEYS = ("cls.predictions.transform.dense.weight", "cls.predictions.bias")
OFFLINE_HINT = ("Use a local path, or the offline preset: --config configs/demo.yaml "
                "(run configs/demo_teacher.yaml first, or simply `make demo`).")


def load_pretrained(cls, ref: str, what: str, **kwargs):
    path = resolve_model_ref(ref)
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1  # hub ids are "org/name"
    if looks_local and not os.path.isdir(path):
        raise KDError(f"{what} folder not found: {path}. " + (
            "Create it first (for the demo: ddp_main.py --config configs/demo_teacher.yaml, or "
            "`make demo`)." if "demo-teacher" in path else "Check the path."))
    if not os.path.isdir(path):
        prepare_hub_access()
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as err:
        if os.path.isdir(path):
            raise KDError(f"cannot load {what} from {path}: {str(err).splitlines()[0]}") from None
        raise hub_error(f"{what} '{ref}'", err, OFFLINE_HINT) from None


def load_tokenizer(ref: str):
    tokenizer = load_pretrained(AutoTokenizer, ref, "tokenizer")
    if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None:
        raise KDError(f"tokenizer '{ref}' has no [MASK]/[CLS] token; a BERT WordPiece tokenizer is needed")
    return tokenizer


def load_mlm_model(ref: str, what: str, require_head: bool, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False) -> BertForMaskedLM:
    model, info = load_pretrained(BertForMaskedLM, ref, what, output_loading_info=True,
                                   attn_implementation="sdpa", dtype=dtype,
                                   trust_remote_code=trust_remote_code)
    missing = set(info["missing_keys"])
    if require_head and any(key in missing for key in MLM_HEAD_KEYS):
        raise KDError(f"{what} '{ref}' has no trained MLM head ({', '.join(sorted(missing & set(MLM_HEAD_KEYS)))} "
                      f"missing), so its logits would be random. Adapt it first with an MLM warm-up, "
                      f"e.g. ddp_main.py --config configs/demo_teacher.yaml, and use its "
                      f"checkpoints/<run>/final as the teacher.")
    if missing:
        log.info("%s: newly initialised weights: %s", what, ", ".join(sorted(missing)))
    return model


def load_teacher(teacher_cfg, device: torch.device) -> BertForMaskedLM:
    """Frozen, eval mode, bf16 on CUDA (the teacher forward is ~2/3 of the work)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = load_mlm_model(teacher_cfg.name, "teacher", require_head=True, dtype=dtype,
                             trust_remote_code=teacher_cfg.trust_remote_code)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def default_init_layers(num_teacher: int, num_student: int) -> List[int]:
    """Evenly spaced from the bottom: 12->6 [0,2,4,6,8,10], 24->6 every 4th, 6->3 [0,2,4]."""
    return [i * num_teacher // num_student for i in range(num_student)]


def default_hidden_map(num_teacher: int, num_student: int, include_embeddings: bool) -> List[Tuple[int, int]]:
    """Pairs of hidden_states indices (0 = embeddings): student i <- teacher i * L_T / L_S (TinyBERT)."""
    pairs = [(i, i * num_teacher // num_student) for i in range(1, num_student + 1)]
    return ([(0, 0)] if include_embeddings else []) + pairs


def student_bert_config(base: BertConfig, student_cfg) -> BertConfig:
    cfg = copy.deepcopy(base)
    cfg.num_hidden_layers = student_cfg.num_layers
    if student_cfg.hidden_size is not None:
        cfg.hidden_size = student_cfg.hidden_size
        if student_cfg.intermediate_size is None:
            cfg.intermediate_size = 4 * student_cfg.hidden_size
        if student_cfg.num_heads is None:
            cfg.num_attention_heads = max(1, student_cfg.hidden_size // 64)
    if student_cfg.num_heads is not None:
        cfg.num_attention_heads = student_cfg.num_heads
    if student_cfg.intermediate_size is not None:
        cfg.intermediate_size = student_cfg.intermediate_size
    if cfg.hidden_size % cfg.num_attention_heads:
        raise KDError(f"student hidden size {cfg.hidden_size} is not divisible by "
                      f"{cfg.num_attention_heads} heads; set student.num_heads")
    cfg._attn_implementation = "sdpa"
    return cfg


def copy_teacher_layers(student: BertForMaskedLM, teacher: BertForMaskedLM, layers: Sequence[int]) -> None:
    """DistilBERT init: embeddings, the chosen encoder layers, and the MLM head."""
    with torch.no_grad():
        student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
        for s_idx, t_idx in enumerate(layers):
            student.bert.encoder.layer[s_idx].load_state_dict(teacher.bert.encoder.layer[t_idx].state_dict())
        student.cls.load_state_dict(teacher.cls.state_dict())
    student.tie_weights()


def build_pruned_student(student_cfg, teacher: BertForMaskedLM, calibration) -> Tuple[BertForMaskedLM, dict]:
    """student.init=pruned: the teacher's most important layers, heads, neurons and channels
    (kd/prune.py), ranked on `calibration` (an iterable of input-id batches). Returns the student
    and the ranking."""
    from kd.prune import check_pruned_shape, prune_into

    shape = check_pruned_shape(student_cfg, teacher.config)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers, config.hidden_size = shape["num_layers"], shape["hidden_size"]
    config.num_attention_heads, config.intermediate_size = shape["num_heads"], shape["intermediate_size"]
    config._attn_implementation = "sdpa"
    config.dtype = torch.float32
    student = BertForMaskedLM(config)
    ranking = prune_into(teacher, student, shape, calibration)
    return student.float(), ranking


def build_student(student_cfg, teacher: Optional[BertForMaskedLM], vocab_size: int) -> BertForMaskedLM:
    init = student_cfg.init
    if init.startswith("pretrained:"):
        ref = init.split(":", 1)[1]
        student = load_mlm_model(ref, "student init", require_head=False)
        if student.config.num_hidden_layers != student_cfg.num_layers:
            raise KDError(f"student.num_layers={student_cfg.num_layers} but '{ref}' has "
                          f"{student.config.num_hidden_layers} layers; set student.num_layers="
                          f"{student.config.num_hidden_layers}")
    else:
        base = teacher.config if teacher is not None else BertConfig(vocab_size=vocab_size)
        config = student_bert_config(base, student_cfg)
        config.dtype = torch.float32
        student = BertForMaskedLM(config)
        if init == "teacher_layers":
            n_teacher = teacher.config.num_hidden_layers
            if student_cfg.num_layers > n_teacher:
                raise KDError(f"student.num_layers={student_cfg.num_layers} is deeper than the teacher "
                              f"({n_teacher} layers), so it cannot be initialised from teacher layers; "
                              f"use student.init=random or fewer layers")
            if config.hidden_size != teacher.config.hidden_size:
                raise KDError(f"student.init=teacher_layers copies weights, so the student width must "
                              f"equal the teacher's ({teacher.config.hidden_size}), not "
                              f"{config.hidden_size}; use student.init=random or pretrained:<path>")
            layers = list(student_cfg.init_layers or default_init_layers(n_teacher, student_cfg.num_layers))
            if len(layers) != student_cfg.num_layers or not all(0 <= i < n_teacher for i in layers):
                raise KDError(f"student.init_layers={layers} must list {student_cfg.num_layers} teacher "
                              f"layer indices in [0, {n_teacher - 1}]")
            copy_teacher_layers(student, teacher, layers)
            log.info("student initialised from teacher layers %s", layers)
    if student.config.vocab_size != vocab_size:
        raise KDError(f"student vocabulary ({student.config.vocab_size}) differs from the tokenizer's "
                      f"({vocab_size}); teacher, student and tokenizer must share one vocabulary")
    return student.float()


def gather_positions(sequence: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, S, H) at (B, k) positions -> (B, k, H); positions=None keeps every position."""
    if positions is None:
        return sequence
    index = positions.unsqueeze(-1).expand(-1, -1, sequence.size(-1))
    return sequence.gather(1, index)


class DecoderInput(NamedTuple):
    """What the MLM head's vocabulary projection would take: logits = hidden @ weight.T + bias.
    kd.fused_head computes the losses from it without materialising the logits."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def mlm_forward(model: BertForMaskedLM, input_ids: torch.Tensor, positions: Optional[torch.Tensor],
                attention_mask: Optional[torch.Tensor] = None, output_hidden_states: bool = False,
                decoder_input: bool = False):
    """Encoder, then the MLM head only at `positions`: the vocab projection costs as much as a
    third of a small student's forward when computed everywhere (DESIGN §4). With decoder_input,
    the head stops before the vocabulary projection and returns a DecoderInput instead of logits."""
    out = model.bert(input_ids=input_ids, attention_mask=attention_mask,
                     output_hidden_states=output_hidden_states)
    head = model.cls.predictions
    at_positions = gather_positions(out.last_hidden_state, positions)
    logits = (DecoderInput(head.transform(at_positions), head.decoder.weight, head.decoder.bias) if decoder_input
              else model.cls(at_positions))
    return logits, (out.hidden_states if output_hidden_states else None)


@contextlib.contextmanager
def capture_qkv(model: BertForMaskedLM, layers: Sequence[int]):
    """Within the block, the query / key / value projections (B, S, width) of the given encoder
    layers, as {layer: (q, k, v)}, filled by forward hooks as the model runs. Attention itself still
    runs through SDPA in every layer: the attention terms recompute what they need from Q and K of
    the few layers they read, so no layer has to fall back to eager attention."""
    captured: Dict[int, Dict[str, torch.Tensor]] = {}
    handles = []
    for layer in sorted(set(layers)):
        attention = model.bert.encoder.layer[layer].attention.self
        for name in ("query", "key", "value"):
            def hook(_module, _inputs, output, layer=layer, name=name):
                captured.setdefault(layer, {})[name] = output
            handles.append(getattr(attention, name).register_forward_hook(hook))
    views: Dict[int, Tuple[torch.Tensor, ...]] = {}
    try:
        yield views
    finally:
        for handle in handles:
            handle.remove()
        views.update({layer: (c["query"], c["key"], c["value"]) for layer, c in captured.items()})


class DistillationStudent(nn.Module):
    """The trainable part: the student plus the projections of its hidden states to the teacher's
    width. Wrapped in DDP as one module; the teacher stays outside (frozen, never synchronised)."""

    def __init__(self, student: BertForMaskedLM, hidden_pairs: Sequence[Tuple[int, int]],
                 teacher_width: Optional[int], attention_layers: Sequence[int] = ()):
        super().__init__()
        self.student = student
        self.hidden_pairs = list(hidden_pairs)
        self.attention_layers = sorted(set(attention_layers))  # layers whose Q/K/V the attention terms read
        width = student.config.hidden_size
        needs_projection = teacher_width is not None and teacher_width != width and self.hidden_pairs
        self.projections = nn.ModuleList(
            [nn.Linear(width, teacher_width) for _ in self.hidden_pairs] if needs_projection else [])

    def forward(self, input_ids, positions=None, attention_mask=None, decoder_input: bool = False):
        """(logits, or a DecoderInput with decoder_input; hidden states of the pairs mapped to the
        teacher's width; {layer: (q, k, v)})."""
        with capture_qkv(self.student, self.attention_layers) as qkv:
            logits, hidden = mlm_forward(self.student, input_ids, positions, attention_mask,
                                         output_hidden_states=bool(self.hidden_pairs), decoder_input=decoder_input)
        mapped = []
        for i, (s_idx, _t_idx) in enumerate(self.hidden_pairs):
            h = hidden[s_idx]
            mapped.append(self.projections[i](h) if len(self.projections) else h)
        return logits, mapped, qkv


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
