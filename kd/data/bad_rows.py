"""Row-level data problems: raise a clear error, or skip and count them, per `data.on_bad_row`.

`CFG` is the config section every data loader's errors quote (classification and SQuAD alike).
"""
from collections import Counter
from typing import List

from kd.errors import KDError

CFG = "data"   # quoted in messages, so each one names the exact override that fixes it
ON_BAD_ROW_CHOICES = ("error", "skip")
MAX_NOTES_PER_REASON = 5   # example messages kept per skip reason, for the log


class BadRows:
    def __init__(self, on_bad_row: str, unit: str = "rows"):
        if on_bad_row not in ON_BAD_ROW_CHOICES:
            raise KDError(f"{CFG}.on_bad_row={on_bad_row!r} is not one of {list(ON_BAD_ROW_CHOICES)}")
        self.on_bad_row = on_bad_row
        self.unit = unit
        self.counts: Counter = Counter()
        self.notes: List[str] = []

    def __call__(self, reason: str, message: str) -> None:
        if self.on_bad_row == "error":
            raise KDError(f"{message}. Fix the data, or set {CFG}.on_bad_row=skip to skip and count "
                          f"such {self.unit}.")
        self.counts[reason] += 1
        if self.counts[reason] <= MAX_NOTES_PER_REASON:
            self.notes.append(f"skipped ({reason}): {message}")
