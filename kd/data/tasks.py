"""Classification tasks: what a task is (`TaskSpec`), the GLUE presets, and one labelled example.

A new GLUE-style task is a new `TaskSpec` entry here, not new code: text fields (one for a single
sentence, two for a pair), label names (index = label id, as in the hub dataset), metrics and hub
splits. `parse_label` reads a label as an id or a name, the same way for every source.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from kd.errors import KDError


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific. `metrics[0]` is the one used to select checkpoints."""
    name: str
    hub_path: str
    hub_config: Optional[str]
    text_fields: Tuple[str, ...]          # one field: single sentence; two: sentence pair
    label_field: str
    label_names: Tuple[str, ...]          # index = label id, as in the hub dataset
    metrics: Tuple[str, ...]              # names understood by kd.metrics.classification_metrics
    hub_splits: Tuple[Tuple[str, str], ...] = (("train", "train"), ("validation", "validation"))

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if len(spec.text_fields) not in (1, 2):
        raise ValueError(f"task {spec.name}: text_fields must have one or two names")
    TASKS[spec.name] = spec
    return spec


for _spec in [
    TaskSpec("sst2", "glue", "sst2", ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
    TaskSpec("cola", "glue", "cola", ("sentence",), "label", ("unacceptable", "acceptable"),
             ("matthews", "accuracy")),
    TaskSpec("mrpc", "glue", "mrpc", ("sentence1", "sentence2"), "label",
             ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    TaskSpec("qqp", "glue", "qqp", ("question1", "question2"), "label",
             ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    TaskSpec("qnli", "glue", "qnli", ("question", "sentence"), "label",
             ("entailment", "not_entailment"), ("accuracy",)),
    TaskSpec("rte", "glue", "rte", ("sentence1", "sentence2"), "label",
             ("entailment", "not_entailment"), ("accuracy",)),
    TaskSpec("mnli", "glue", "mnli", ("premise", "hypothesis"), "label",
             ("entailment", "neutral", "contradiction"), ("accuracy",),
             hub_splits=(("train", "train"), ("validation", "validation_matched"),
                         ("validation_mismatched", "validation_mismatched"))),
]:
    register_task(_spec)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KDError(f"unknown classification task {name!r}; known tasks: {sorted(TASKS)}. "
                      f"Add a TaskSpec preset in kd/data/tasks.py for a new one.")
    return TASKS[name]


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: Optional[str]
    label: int                 # -1: unlabelled (a test file without a label column)


def parse_label(value, label_names: Sequence[str]) -> Optional[int]:
    """A label id (int, or its decimal string) or a label name (case-insensitive); None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value if 0 <= value < len(label_names) else None
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return parse_label(int(text), label_names)
        lowered = [name.lower() for name in label_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    return None
