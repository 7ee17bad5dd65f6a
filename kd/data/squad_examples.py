"""SQuAD v1.1 examples: the JSON files and the hub dataset read into questions with their answers,
each checked (ids, offsets, answers inside the context), bad rows counted or refused by name."""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from kd.data.bad_rows import CFG, BadRows
from kd.errors import KDError
from kd.hub import hub_error, prepare_hub_access

SQUAD_SHAPE = ('{"data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [{"id": ..., '
               '"question": ..., "answers": [{"text": ..., "answer_start": int}]}]}]}]}')


@dataclass(frozen=True)
class SquadAnswer:
    text: str
    start: int          # character offset in the context


@dataclass
class SquadExample:
    id: str
    question: str
    context: str
    answers: List[SquadAnswer]
    title: str = ""


@dataclass
class SquadData:
    splits: Dict[str, List[SquadExample]]
    skipped: Dict[str, Dict[str, int]] = field(default_factory=dict)   # split -> reason -> count
    notes: List[str] = field(default_factory=list)

    @property
    def split_sizes(self) -> Dict[str, int]:
        return {name: len(rows) for name, rows in self.splits.items()}

    def summary(self) -> dict:
        return {"split_sizes": self.split_sizes, "skipped": self.skipped}




def _check_question(where: str, qid, question, context, answers: Iterable[Tuple[object, object]],
                    bad: BadRows, seen_ids: set) -> Optional[SquadExample]:
    """One question -> a SquadExample, or None (counted) if it is bad and bad rows are skipped."""
    if not isinstance(qid, str) or not qid:
        bad("malformed_question", f"{where}: question without a string 'id' ({qid!r})")
        return None
    if qid in seen_ids:
        bad("duplicate_id", f"{where}: question id {qid!r} appears more than once")
        return None
    if not isinstance(question, str) or not question.strip():
        bad("malformed_question", f"{where}: question {qid!r} has no 'question' text")
        return None
    if not isinstance(context, str) or not context.strip():
        bad("malformed_question", f"{where}: question {qid!r} has no 'context' text")
        return None
    checked = []
    for text, start in answers:
        if not isinstance(text, str) or not text.strip() or isinstance(start, bool) \
                or not isinstance(start, int):
            bad("malformed_answer", f"{where}: question {qid!r} has an answer without string "
                                    f"'text' and int 'answer_start' (text={text!r}, start={start!r})")
            continue
        found = context[start:start + len(text)] if 0 <= start <= len(context) else ""
        if found != text:
            bad("answer_mismatch", f"{where}: question {qid!r}: answer_start {start} points to "
                                   f"{found!r} in the context, but the answer text is {text!r}")
            continue
        checked.append(SquadAnswer(text, start))
    if not checked:
        bad("no_answer", f"{where}: question {qid!r} has no valid answer (SQuAD v1.1 needs at least "
                         f"one; unanswerable SQuAD v2.0 questions are not supported)")
        return None
    seen_ids.add(qid)
    return SquadExample(qid, question, context, checked)


def read_squad_json(path: str, on_bad_row: str = "error"
                    ) -> Tuple[List[SquadExample], Dict[str, int], List[str]]:
    """Read a local SQuAD v1.1 JSON file. Returns (examples, skip counts by reason, skip notes)."""
    bad = BadRows(on_bad_row, "questions")
    if not os.path.isfile(path):
        raise KDError(f"SQuAD file not found: {path}. Check {CFG}.train / {CFG}.validation.")
    if os.path.getsize(path) == 0:
        raise KDError(f"SQuAD file is empty: {path}. Expected SQuAD v1.1 JSON: {SQUAD_SHAPE}")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except UnicodeDecodeError as err:
        raise KDError(f"{path}: bytes that are not UTF-8 at byte {err.start} ({err.reason}); "
                      f"re-save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise KDError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        found = list(doc) if isinstance(doc, dict) else type(doc).__name__
        raise KDError(f"{path}: expected SQuAD v1.1 JSON {SQUAD_SHAPE}; found top level {found}")
    examples, seen = [], set()
    for a, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise KDError(f"{path}: data[{a}] has no 'paragraphs' list; expected {SQUAD_SHAPE}")
        title = article.get("title", "")
        for p, paragraph in enumerate(paragraphs):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise KDError(f"{path}: data[{a}].paragraphs[{p}] has no 'qas' list; expected {SQUAD_SHAPE}")
            context = paragraph.get("context")
            for q, qa in enumerate(paragraph["qas"]):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    bad("malformed_question", f"{where}: not a JSON object")
                    continue
                answers = qa.get("answers") or []
                if not isinstance(answers, list):
                    answers = [answers]
                pairs = [(ans.get("text"), ans.get("answer_start")) if isinstance(ans, dict)
                         else (None, None) for ans in answers]
                example = _check_question(where, qa.get("id"), qa.get("question"), context, pairs,
                                          bad, seen)
                if example is not None:
                    example.title = title
                    examples.append(example)
    if not examples:
        raise KDError(f"{path}: no usable questions" + (f" ({dict(bad.counts)} skipped)" if bad.counts else ""))
    return examples, dict(bad.counts), bad.notes


def load_hub_squad(on_bad_row: str = "error") -> SquadData:
    import datasets

    prepare_hub_access()
    try:
        loaded = datasets.load_dataset("squad")
    except Exception as err:  # offline: ConnectionError / OSError / DatasetNotFoundError
        raise hub_error("dataset 'squad'", err,
                        f"For offline fine-tuning use {CFG}.source=files with {CFG}.train=PATH "
                        f"{CFG}.validation=PATH (SQuAD v1.1 JSON files, e.g. train-v1.1.json "
                        f"and dev-v1.1.json).") from None
    data = SquadData({})
    for split in ("train", "validation"):
        bad, seen, rows = BadRows(on_bad_row, "questions"), set(), []
        for index, row in enumerate(loaded[split]):
            answers = row["answers"]
            example = _check_question(f"squad/{split} row {index}", row["id"], row["question"],
                                      row["context"], zip(answers["text"], answers["answer_start"]),
                                      bad, seen)
            if example is not None:
                example.title = row.get("title", "")
                rows.append(example)
        data.splits[split] = rows
        if bad.counts:
            data.skipped[split] = dict(bad.counts)
        data.notes += bad.notes
    return data


def load_squad(source: str = "hub", train_file: Optional[str] = None,
               validation_file: Optional[str] = None, on_bad_row: str = "error") -> SquadData:
    """SQuAD v1.1 from the hub (`source="hub"`) or local JSON files (`source="files"`)."""
    BadRows(on_bad_row, "questions")
    if source == "hub":
        return load_hub_squad(on_bad_row)
    if source != "files":
        raise KDError(f"{CFG}.source={source!r} for SQuAD must be 'hub' or 'files'")
    files = {name: path for name, path in (("train", train_file), ("validation", validation_file)) if path}
    if not files:
        raise KDError(f"{CFG}.source=files needs {CFG}.train=PATH and/or "
                      f"{CFG}.validation=PATH (SQuAD v1.1 JSON)")
    data = SquadData({})
    for name, path in files.items():
        rows, counts, notes = read_squad_json(path, on_bad_row)
        data.splits[name] = rows
        if counts:
            data.skipped[name] = counts
        data.notes += notes
    return data


def squad_references(examples: Sequence[SquadExample]) -> Dict[str, List[str]]:
    """{question id: reference answer texts}, the input `kd.metrics.squad_metrics` wants."""
    return {e.id: [a.text for a in e.answers] for e in examples}
