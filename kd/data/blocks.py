"""Tokenise documents once, concatenate, and cut into fixed `[CLS] ... [SEP]` blocks.

Full blocks mean no padding: every batch has the same shape, attention needs no mask (so SDPA
can use its flash kernel on GPU), and the number of masked positions per block is a constant.
The token ids are cached as .npy files keyed by corpus, tokenizer and seq_len, so a second run
starts in seconds; rank 0 builds the cache while the other ranks wait.
"""
import hashlib
import json
import logging
import os
from typing import List

import numpy as np
from tqdm.auto import tqdm

from kd import dist
from kd.data.corpus import corpus_fingerprint, load_corpus
from kd.errors import KDError

log = logging.getLogger(__name__)


def tokenize_to_blocks(docs: List[str], tokenizer, seq_len: int, desc: str = "tokenising",
                       batch_docs: int = 256) -> np.ndarray:
    """Documents -> (n_blocks, seq_len) token ids; the tail shorter than one block is dropped."""
    body = seq_len - 2
    ids: List[np.ndarray] = []
    show = dist.is_rank0()
    for start in tqdm(range(0, len(docs), batch_docs), desc=desc, disable=not show, unit="batch"):
        chunk = [d for d in docs[start:start + batch_docs] if d.strip()]
        if not chunk:
            continue
        encoded = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        ids.extend(np.asarray(e, dtype=np.int64) for e in encoded)
    stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    n_blocks = len(stream) // body
    dtype = np.uint16 if len(tokenizer) < 2 ** 16 else np.int32
    blocks = np.empty((n_blocks, seq_len), dtype=dtype)
    blocks[:, 0] = tokenizer.cls_token_id
    blocks[:, -1] = tokenizer.sep_token_id
    blocks[:, 1:-1] = stream[: n_blocks * body].reshape(n_blocks, body)
    return blocks


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(vocab).hexdigest()[:16]


def cache_key(data_cfg, tokenizer, seed: int) -> str:
    desc = {"corpus": corpus_fingerprint(data_cfg), "tokenizer": tokenizer_fingerprint(tokenizer),
            "lowercase": tokenizer("A")["input_ids"], "seq_len": data_cfg.seq_len, "seed": seed,
            "on_bad_bytes": data_cfg.on_bad_bytes, "format": 1}  # skip and error can keep different text
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def load_blocks(data_cfg, tokenizer, seed: int = 0):
    """(train_blocks, validation_blocks) as memory-mapped uint16 arrays, built once and cached."""
    key = cache_key(data_cfg, tokenizer, seed)
    folder = os.path.join(data_cfg.cache_dir, f"blocks-{key}")
    paths = {split: os.path.join(folder, f"{split}.npy") for split in ("train", "validation")}

    def build() -> None:
        if all(os.path.isfile(p) for p in paths.values()):
            return
        os.makedirs(folder, exist_ok=True)
        train_docs, val_docs = load_corpus(data_cfg, seed)
        for split, docs in (("train", train_docs), ("validation", val_docs)):
            blocks = tokenize_to_blocks(docs, tokenizer, data_cfg.seq_len, desc=f"tokenising {split}")
            _save_atomic(paths[split], blocks)
        with open(os.path.join(folder, "info.json"), "w") as fh:
            json.dump({"corpus": corpus_fingerprint(data_cfg), "seq_len": data_cfg.seq_len,
                       "blocks": {s: int(np.load(p, mmap_mode="r").shape[0]) for s, p in paths.items()}},
                      fh, indent=1)
        log.info("cached token blocks in %s", folder)

    dist.rank0_first(build)
    train, val = (np.load(paths[s], mmap_mode="r") for s in ("train", "validation"))
    if len(train) == 0:
        raise KDError(f"the training corpus yields no full block of data.seq_len={data_cfg.seq_len} "
                      f"tokens; use more text or a shorter seq_len")
    return train, val
