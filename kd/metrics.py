"""Evaluation metrics for fine-tuning, all in percent (0-100), as papers and GLUE report them.

torchmetrics does the arithmetic (it works offline; `evaluate.load` fetches scripts from the hub).
"""
from typing import Dict, List, Mapping, Sequence

import torch
from torchmetrics.functional.classification import (binary_f1_score, multiclass_accuracy,
                                                    multiclass_matthews_corrcoef)
from torchmetrics.text import SQuAD

CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")


def classification_metrics(names: Sequence[str], preds: torch.Tensor, labels: torch.Tensor,
                           num_labels: int) -> Dict[str, float]:
    """`preds` are predicted class ids (argmax of the logits), `labels` the gold ids.

    f1 is the F1 of class 1 (binary tasks: MRPC "equivalent", QQP "duplicate"), as GLUE reports it.
    """
    preds, labels = torch.as_tensor(preds).long().flatten(), torch.as_tensor(labels).long().flatten()
    if preds.shape != labels.shape or preds.numel() == 0:
        raise ValueError(f"need equally many predictions and labels, got {preds.shape} and {labels.shape}")
    if labels.min() < 0:
        raise ValueError("labels contain -1 (unlabelled rows); metrics need a labelled split")
    out = {}
    for name in names:
        if name == "accuracy":
            value = multiclass_accuracy(preds, labels, num_classes=num_labels, average="micro")
        elif name == "f1":
            if num_labels != 2:
                raise ValueError("f1 here is binary F1; the task has more than two labels")
            value = binary_f1_score(preds, labels)
        elif name == "matthews":
            value = multiclass_matthews_corrcoef(preds, labels, num_classes=num_labels)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {CLASSIFICATION_METRICS}")
        out[name] = 100.0 * float(value)
    return out


def squad_inputs(predictions: Mapping[str, str], references: Mapping[str, List[str]]):
    """The (preds, target) lists that `torchmetrics.text.SQuAD` expects."""
    preds = [{"id": qid, "prediction_text": text} for qid, text in predictions.items()]
    target = [{"id": qid, "answers": {"text": list(answers), "answer_start": [-1] * len(answers)}}
              for qid, answers in references.items()]
    return preds, target


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, List[str]]
                  ) -> Dict[str, float]:
    """Exact match and F1 (percent) with the official SQuAD v1.1 answer normalisation.

    As in the official script, a question with no prediction scores 0, the best score over the
    reference answers counts, and predictions for unknown ids are ignored.
    """
    if not references:
        raise ValueError("squad_metrics needs at least one reference question")
    empty = [qid for qid, answers in references.items() if not answers]
    if empty:
        raise ValueError(f"questions without reference answers: {empty[:5]}")
    scores = SQuAD()(*squad_inputs(predictions, references))
    return {"exact_match": float(scores["exact_match"]), "f1": float(scores["f1"])}
