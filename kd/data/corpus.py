"""Pretraining corpus sources -> lists of documents (train, validation).

Sources: the Hugging Face hub (WikiText-103 for real runs), local .txt/.jsonl files, and the
Wikipedia sample that ships inside gensim (offline demo and tests).
"""
import bz2
import json
import logging
import os
import random
from typing import List, Tuple

from kd import assets
from kd.errors import KDError
from kd.hub import hub_error, prepare_hub_access

log = logging.getLogger(__name__)
Docs = List[str]


def load_hub_corpus(dataset: str, config: str) -> Tuple[Docs, Docs]:
    import datasets
    prepare_hub_access()
    try:
        splits = datasets.load_dataset(dataset, config)
    except Exception as err:  # offline: ConnectionError / OSError / DatasetNotFoundError
        raise hub_error(f"dataset '{dataset}/{config}'", err,
                              "For the offline pipeline use --config configs/demo.yaml "
                              "(data.source=wiki_sample), or data.source=text with local files.") from None
    if "validation" not in splits:
        raise KDError(f"dataset '{dataset}/{config}' has no validation split; "
                      f"use data.source=text with data.validation_files")
    return list(splits["train"]["text"]), list(splits["validation"]["text"])


def _read_lines(path: str, on_bad_bytes: str) -> List[str]:
    if not os.path.isfile(path):
        raise KDError(f"corpus file not found: {path}. Check data.train_files / data.validation_files.")
    lines, bad = [], 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                if on_bad_bytes == "error":
                    raise KDError(f"{path}:{number}: undecodable bytes ({err.reason}). Fix the file, "
                                  f"or set data.on_bad_bytes=skip to skip and count such lines.") from None
                bad += 1
    if bad:
        log.warning("%s: skipped %d line(s) with undecodable bytes", path, bad)
    return lines


def read_text_file(path: str, on_bad_bytes: str = "skip") -> Docs:
    """.jsonl: one document per line in a "text" field. Otherwise: documents split by blank lines."""
    lines = _read_lines(path, on_bad_bytes)
    if path.endswith(".jsonl"):
        docs = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise KDError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "text" not in row:
                raise KDError(f"{path}:{number}: each JSONL row needs a \"text\" field")
            docs.append(str(row["text"]))
        return docs
    docs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            docs.append(" ".join(current))
            current = []
    if current:
        docs.append(" ".join(current))
    return docs


def wiki_sample_articles() -> Docs:
    """Plain text of the real Wikipedia articles bundled with gensim (markup stripped)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    articles = []
    with bz2.open(assets.wiki_sample_path(), "rb") as fh:
        for _title, text, _pageid in extract_pages(fh):
            plain = filter_wiki(text).replace("'''", "").replace("''", '"')
            # Keep paragraph text; drop the blank-line noise and residual table/heading lines.
            paragraphs = [p.strip() for p in plain.split("\n") if len(p.strip()) > 40]
            if paragraphs:
                articles.append("\n".join(paragraphs))
    return articles


def split_documents(docs: Docs, validation_fraction: float, seed: int) -> Tuple[Docs, Docs]:
    """Hold out whole documents (not blocks), so validation text is never seen in training."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * validation_fraction))
    if n_val >= len(docs):
        raise KDError(f"only {len(docs)} document(s): too few to hold out a validation split; "
                      f"add data or give data.validation_files")
    val_ids = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def load_corpus(data_cfg, seed: int = 0) -> Tuple[Docs, Docs]:
    """(train documents, validation documents) for the configured source."""
    if data_cfg.source == "hub":
        train, val = load_hub_corpus(data_cfg.hub_dataset, data_cfg.hub_config)
    elif data_cfg.source == "wiki_sample":
        train, val = split_documents(wiki_sample_articles(), data_cfg.validation_fraction, seed)
    else:
        train = [d for f in data_cfg.train_files for d in read_text_file(f, data_cfg.on_bad_bytes)]
        if not any(d.strip() for d in train):  # before the split, whose message would mislead
            raise KDError(f"the training corpus is empty: no text in data.train_files "
                          f"{list(data_cfg.train_files)}. Point data.train_files at non-empty .txt or "
                          f".jsonl files.")
        if data_cfg.validation_files:
            val = [d for f in data_cfg.validation_files for d in read_text_file(f, data_cfg.on_bad_bytes)]
        else:
            train, val = split_documents(train, data_cfg.validation_fraction, seed)
    if not any(d.strip() for d in train):
        raise KDError(f"the training corpus ({data_cfg.source}) is empty: no text found")
    return train, val


def corpus_fingerprint(data_cfg) -> dict:
    """What identifies the corpus for caching (files by size and mtime, so edits invalidate)."""
    desc = {"source": data_cfg.source, "validation_fraction": data_cfg.validation_fraction}
    if data_cfg.source == "hub":
        desc["hub"] = f"{data_cfg.hub_dataset}/{data_cfg.hub_config}"
    elif data_cfg.source == "wiki_sample":
        path = assets.wiki_sample_path()
        desc["file"] = [os.path.basename(path), os.path.getsize(path)]
    else:
        for key in ("train_files", "validation_files"):
            files = list(getattr(data_cfg, key))
            for f in files:
                if not os.path.isfile(f):
                    raise KDError(f"corpus file not found: {f}. Check data.{key}.")
            desc[key] = [[os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files]
    return desc
