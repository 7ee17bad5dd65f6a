"""SQuAD v1.1 extractive QA features: windowed inputs and span post-processing (the examples are
read by kd/data/squad_examples.py).

A context longer than one window is split into overlapping windows (max_length 384, the last
`doc_stride`=128 context tokens of a window repeated at the start of the next, as in BERT).
Training: each window is labelled with the answer's start/end token, or (0, 0) = [CLS] when the
answer is not wholly inside it. Evaluation: every window is scored; the best valid span over all
windows of a question is mapped back to the context text through the tokenizer's offsets.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from kd.data.squad_examples import SquadExample
from kd.errors import KDError

def _check_window_args(tokenizer, max_length: int, doc_stride: int, max_query_length: int) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise KDError("SQuAD preprocessing needs a fast (Rust) tokenizer for offset mappings; load "
                      "it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    # [CLS] question [SEP] context [SEP]: the window must hold the question, 3 specials, and more
    # context than the overlap, or windows would not advance.
    room = max_length - max_query_length - 3
    if room <= doc_stride:
        raise KDError(f"doc_stride={doc_stride} must be smaller than max_length - max_query_length - 3"
                      f" = {room}; lower doc_stride or max_query_length, or raise max_length")


def _truncate_questions(questions: List[str], tokenizer, max_query_length: int) -> List[str]:
    """Cut questions to `max_query_length` tokens at a character boundary (as BERT's SQuAD code)."""
    questions = [q.lstrip() for q in questions]   # leading spaces only waste tokens
    encoded = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for question, offsets in zip(questions, encoded["offset_mapping"]):
        out.append(question[:offsets[max_query_length - 1][1]] if len(offsets) > max_query_length
                   else question)
    return out


def _windows(examples: Sequence[SquadExample], tokenizer, max_length: int, doc_stride: int,
             max_query_length: int):
    _check_window_args(tokenizer, max_length, doc_stride, max_query_length)
    questions = _truncate_questions([e.question for e in examples], tokenizer, max_query_length)
    side = getattr(tokenizer, "padding_side", "right")
    if side != "right":
        raise KDError(f"tokenizer.padding_side={side!r}; SQuAD windows expect right padding")
    return tokenizer(questions, [e.context for e in examples], truncation="only_second",
                     max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True, padding="max_length", return_token_type_ids=True)


def _tensors(encoded) -> Dict[str, torch.Tensor]:
    return {key: torch.tensor(encoded[key], dtype=torch.long)
            for key in ("input_ids", "attention_mask", "token_type_ids")}


def answer_token_span(offsets: Sequence[Tuple[int, int]], sequence_ids: Sequence[Optional[int]],
                      start_char: int, end_char: int) -> Tuple[int, int]:
    """Token positions (start, end), inclusive, of the answer chars [start_char, end_char) in one
    window; (0, 0) = [CLS] when the answer is not wholly inside the window's context."""
    context = [i for i, s in enumerate(sequence_ids) if s == 1]
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0
    start = first
    while start <= last and offsets[start][1] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][0] >= end_char:
        end -= 1
    return start, end


def _window_chunks(examples: Sequence[SquadExample], tokenizer, max_length: int, doc_stride: int,
                   max_query_length: int, chunk_size: int = 1000):
    """(index of the chunk's first example, encoded windows) per chunk of examples; chunking keeps
    the Python lists the tokenizer returns small (all of SQuAD train at once would take GBs)."""
    for first in range(0, len(examples), chunk_size):
        yield first, _windows(examples[first:first + chunk_size], tokenizer, max_length, doc_stride,
                              max_query_length)


def prepare_train_features(examples: Sequence[SquadExample], tokenizer, max_length: int = 384,
                           doc_stride: int = 128, max_query_length: int = 64,
                           chunk_size: int = 1000) -> Dict[str, torch.Tensor]:
    """Windows of every example (first answer) -> input_ids, attention_mask, token_type_ids,
    start_positions, end_positions; also example_index (which example each window came from)."""
    parts = []
    for first, encoded in _window_chunks(examples, tokenizer, max_length, doc_stride, max_query_length,
                                          chunk_size):
        sample_of = [first + i for i in encoded["overflow_to_sample_mapping"]]
        starts, ends = [], []
        for window, offsets in enumerate(encoded["offset_mapping"]):
            answer = examples[sample_of[window]].answers[0]
            start, end = answer_token_span(offsets, encoded.sequence_ids(window), answer.start,
                                           answer.start + len(answer.text))
            starts.append(start)
            ends.append(end)
        part = _tensors(encoded)
        part["start_positions"] = torch.tensor(starts, dtype=torch.long)
        part["end_positions"] = torch.tensor(ends, dtype=torch.long)
        part["example_index"] = torch.tensor(sample_of, dtype=torch.long)
        parts.append(part)
    if not parts:
        raise ValueError("prepare_train_features() got no examples")
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


@dataclass
class SquadEvalFeatures:
    tensors: Dict[str, torch.Tensor]                       # input_ids, attention_mask, token_type_ids
    example_ids: List[str]                                 # question id of each window
    offset_mapping: List[List[Optional[Tuple[int, int]]]]  # None outside the context

    def __len__(self) -> int:
        return len(self.example_ids)


def prepare_eval_features(examples: Sequence[SquadExample], tokenizer, max_length: int = 384,
                          doc_stride: int = 128, max_query_length: int = 64,
                          chunk_size: int = 1000) -> SquadEvalFeatures:
    parts, example_ids, offset_mapping = [], [], []
    for first, encoded in _window_chunks(examples, tokenizer, max_length, doc_stride, max_query_length,
                                          chunk_size):
        for window, offsets in enumerate(encoded["offset_mapping"]):
            sequence_ids = encoded.sequence_ids(window)
            offset_mapping.append([tuple(o) if sequence_ids[i] == 1 else None
                                   for i, o in enumerate(offsets)])
            example_ids.append(examples[first + encoded["overflow_to_sample_mapping"][window]].id)
        parts.append(_tensors(encoded))
    if not parts:
        raise ValueError("prepare_eval_features() got no examples")
    tensors = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return SquadEvalFeatures(tensors, example_ids, offset_mapping)


class TensorDictDataset(Dataset):
    """Row i of every tensor in a dict; the default collate stacks them back into a dict."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors have different lengths: {sizes}")
        self.tensors = tensors
        self.length = sizes.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {key: tensor[index] for key, tensor in self.tensors.items()}


# ---------------------------------------------------------------------------------------------
# post-processing

def postprocess_predictions(examples: Sequence[SquadExample], features: SquadEvalFeatures,
                            start_logits, end_logits, n_best: int = 20,
                            max_answer_length: int = 30) -> Dict[str, str]:
    """Best answer text per question id, over all its windows.

    In each window the `n_best` highest start and end logits are paired; a pair is a candidate if
    both tokens are context tokens, end >= start and the span has at most `max_answer_length`
    tokens. Score = start_logit + end_logit. A question with no valid candidate gets "".
    `start_logits`/`end_logits`: [num_windows, seq_len], in the order of `features`.
    """
    start_logits = np.asarray(torch.as_tensor(start_logits).detach().float().cpu())
    end_logits = np.asarray(torch.as_tensor(end_logits).detach().float().cpu())
    if start_logits.shape != end_logits.shape or start_logits.shape[0] != len(features):
        raise ValueError(f"logits {start_logits.shape} / {end_logits.shape} do not match "
                         f"{len(features)} windows")
    by_id = {e.id: e for e in examples}
    best: Dict[str, Tuple[float, str]] = {}
    for window, qid in enumerate(features.example_ids):
        context = by_id[qid].context
        offsets = features.offset_mapping[window]
        s_logits, e_logits = start_logits[window], end_logits[window]
        top_starts = np.argsort(s_logits)[::-1][:n_best]
        top_ends = np.argsort(e_logits)[::-1][:n_best]
        for s in top_starts:
            if s >= len(offsets) or offsets[s] is None:
                continue
            for e in top_ends:
                if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_logits[s] + e_logits[e])
                if qid not in best or score > best[qid][0]:
                    best[qid] = (score, context[offsets[s][0]:offsets[e][1]])
    return {e.id: best[e.id][1] if e.id in best else "" for e in examples}
