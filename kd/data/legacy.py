"""The first corpus path, kept only as a reference: bench/corpus_prep.py times it beside the new one,
and tests/test_corpus_prep.py checks that both give the same blocks. Training never uses it.

It reads every document into a Python list, tokenises them in one process, and concatenates the
ids as int64 arrays: about 6.4 bytes of memory per byte of text (DESIGN §4).
"""
import json
import logging
import random
from typing import List, Tuple

import numpy as np

from kd.data.corpus import wiki_sample_articles
from kd.errors import KDError

log = logging.getLogger(__name__)
Docs = List[str]


def read_text_file(path: str, on_bad_bytes: str = "skip") -> Docs:
    """.jsonl: one document per line in a "text" field. Otherwise: documents split by blank lines."""
    lines, bad = [], 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                if on_bad_bytes == "error":
                    raise KDError(f"{path}:{number}: undecodable bytes ({err.reason})") from None
                bad += 1
    if bad:
        log.warning("%s: skipped %d line(s) with undecodable bytes", path, bad)
    if path.endswith(".jsonl"):
        return [str(json.loads(line)["text"]) for line in lines if line.strip()]
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


def split_documents(docs: Docs, validation_fraction: float, seed: int) -> Tuple[Docs, Docs]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:max(1, round(len(docs) * validation_fraction))])
    return ([d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids])


def tokenize_to_blocks(docs: Docs, tokenizer, seq_len: int, batch_docs: int = 256) -> np.ndarray:
    """Documents -> (n_blocks, seq_len) token ids; the tail shorter than one block is dropped."""
    body = seq_len - 2
    ids: List[np.ndarray] = []
    for start in range(0, len(docs), batch_docs):
        chunk = [d for d in docs[start:start + batch_docs] if d.strip()]
        if chunk:
            encoded = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                                return_token_type_ids=False)["input_ids"]
            ids.extend(np.asarray(e, dtype=np.int64) for e in encoded)
    stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    n_blocks = len(stream) // body
    blocks = np.empty((n_blocks, seq_len), dtype=np.uint16 if len(tokenizer) < 2 ** 16 else np.int32)
    blocks[:, 0] = tokenizer.cls_token_id
    blocks[:, -1] = tokenizer.sep_token_id
    blocks[:, 1:-1] = stream[: n_blocks * body].reshape(n_blocks, body)
    return blocks


def legacy_blocks(data_cfg, tokenizer, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(train, validation) blocks the first way, for source=text or wiki_sample."""
    if data_cfg.source == "wiki_sample":
        train, val = split_documents(wiki_sample_articles(), data_cfg.validation_fraction, seed)
    else:
        train = [d for f in data_cfg.train_files for d in read_text_file(f, data_cfg.on_bad_bytes)]
        if data_cfg.validation_files:
            val = [d for f in data_cfg.validation_files for d in read_text_file(f, data_cfg.on_bad_bytes)]
        else:
            train, val = split_documents(train, data_cfg.validation_fraction, seed)
    return (tokenize_to_blocks(train, tokenizer, data_cfg.seq_len),
            tokenize_to_blocks(val, tokenizer, data_cfg.seq_len))
