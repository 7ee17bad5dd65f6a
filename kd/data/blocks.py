"""Token blocks: prepared once per corpus, tokenizer and settings, cached, memory-mapped by training.

Full `[CLS] ... [SEP]` blocks mean no padding: every batch has the same shape, attention needs no
mask (so SDPA can use its flash kernel on GPU), and the number of masked positions per block is a
constant. Preparation (kd/data/tokenizing.py, kd/data/block_writer.py) runs with bounded memory
and `data.num_proc` tokenising processes; `ddp_main.py --prepare-only` runs it alone.

Cache layout: <data.cache_dir>/blocks-<key>/ holds train.npy, validation.npy and info.json. Every
setting that changes the bytes is in the key. The folder only ever appears complete: it is written
as blocks-<key>.tmp and renamed. Until then the tokenised rows live in blocks-<key>.work, so a rerun
after an interruption reuses the tokenising that finished. Jobs preparing the same cache take turns
(a file lock); in one DDP job rank 0 prepares while the other ranks wait.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Sequence

import numpy as np

from kd import dist
from kd.data.block_writer import DISK_FULL, BlockFile, SourceTokens, disk_full_error, write_blocks
from kd.data.corpus import HELD_OUT, corpus_fingerprint, document_sources, held_out_mask
from kd.data.tokenizing import RowTokenizer, pipeline_fingerprint, token_dtype, tokenize_source
from kd.errors import KDError

log = logging.getLogger(__name__)
SPLITS = ("train", "validation")
FORMAT = 2  # 2: prepared with datasets (same blocks as format 1); the key also covers the tokenizer pipeline


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(vocab).hexdigest()[:16]


def _file_stamps(data_cfg) -> list:
    if data_cfg.source != "text":
        return []
    return [[os.path.abspath(f), os.stat(f).st_mtime_ns] for f in
            list(data_cfg.train_files) + list(data_cfg.validation_files) if os.path.isfile(f)]


def cache_key(data_cfg, tokenizer, seed: int, splits: Sequence[str] = SPLITS) -> str:
    """Everything that changes the blocks' bytes; not data.num_proc, which does not."""
    desc = {"corpus": corpus_fingerprint(data_cfg), "mtime_ns": _file_stamps(data_cfg),
            "tokenizer": tokenizer_fingerprint(tokenizer), "pipeline": pipeline_fingerprint(tokenizer),
            "seq_len": data_cfg.seq_len, "seed": seed, "on_bad_bytes": data_cfg.on_bad_bytes,
            "splits": list(splits), "format": FORMAT}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


def cache_folder(data_cfg, tokenizer, seed: int, splits: Sequence[str] = SPLITS) -> str:
    return os.path.join(data_cfg.cache_dir, f"blocks-{cache_key(data_cfg, tokenizer, seed, splits)}")


def _complete(folder: str, splits: Sequence[str]) -> bool:
    """Whether `folder` holds every split at the size info.json gives. A folder that exists but does
    not (files deleted or cut by hand) is removed, so it is built again."""
    if not os.path.isdir(folder):
        return False
    try:
        with open(os.path.join(folder, "info.json")) as fh:
            counts = json.load(fh)["blocks"]
        if all(np.load(os.path.join(folder, f"{s}.npy"), mmap_mode="r").shape[0] == counts[s] for s in splits):
            return True
    except (OSError, ValueError, KeyError) as err:
        log.warning("token block cache %s is incomplete (%s); building it again", folder, err)
    shutil.rmtree(folder)
    return False


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as fh:
        waited = 0.0
        while True:
            try:  # released when the file closes, also if the holder dies
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited % 60 == 0:
                    log.info("waiting for another process that prepares the same blocks (%s)", path)
                time.sleep(1)
                waited += 1
        yield


def _refuse_in_a_spawned_worker() -> None:
    """A script without a main guard runs again in every spawned worker, which would prepare again
    (and wait forever for the lock its parent holds). `_inheriting` is set while a spawned process
    runs its parent's main script: multiprocessing's own check for this mistake reads it too."""
    import multiprocess
    if getattr(multiprocess.current_process(), "_inheriting", False):
        raise KDError("a tokenising worker process is running the main script again: put the script's code "
                      "under `if __name__ == \"__main__\":` (data.num_proc > 1 spawns worker processes)")


def prepare_blocks(data_cfg, tokenizer, seed: int = 0, splits: Sequence[str] = SPLITS) -> str:
    """Build the block cache if it is not there; returns its folder."""
    folder = cache_folder(data_cfg, tokenizer, seed, splits)
    if _complete(folder, splits):
        return folder
    _refuse_in_a_spawned_worker()
    with _locked(folder + ".lock"):
        if not _complete(folder, splits):  # another job may have built it while this one waited
            _build(data_cfg, tokenizer, seed, splits, folder)
    return folder


def _empty_corpus(data_cfg) -> KDError:
    if data_cfg.source == "text":
        return KDError(f"the training corpus is empty: no text in data.train_files {list(data_cfg.train_files)}. "
                       f"Point data.train_files at non-empty .txt or .jsonl files.")
    return KDError(f"the training corpus ({data_cfg.source}) is empty: no text found")


def _tokenize(data_cfg, tokenizer, splits, work: str):
    sources = document_sources(data_cfg, splits, work)
    row_tokenizer = RowTokenizer(tokenizer, data_cfg.on_bad_bytes)
    tokens = []
    for i, source in enumerate(sources):
        try:
            files = tokenize_source(source.rows, row_tokenizer, data_cfg.num_proc,
                                    os.path.join(work, f"tokens-{i}.arrow"), f"tokenising {source.name}")
        except OSError as err:  # also from a worker process: datasets passes its exception on
            if err.errno not in DISK_FULL:
                raise
            raise disk_full_error(err.filename or os.path.join(work, f"tokens-{i}.arrow"),
                                  f"tokenised rows of {source.name}", _text_bytes(source) // 2, err) from None
        tokens.append(SourceTokens(files, source.split))
    return sources, tokens


def _text_bytes(source) -> int:
    """Text size of a source. Its token rows take about half of it: a uint16 id per 4-5 bytes of
    English text."""
    if "start" in source.rows.column_names:
        return int(sum(e - s for s, e in zip(source.rows["start"], source.rows["end"])))
    return int(source.rows.data.nbytes)


def _count(data_cfg, seed: int, splits: Sequence[str], sources, tokens) -> dict:
    """Documents (drawing the held-out ones) and tokens per split; empty corpora fail here."""
    for source, source_tokens in zip(sources, tokens):
        source_tokens.count_documents()
        for index, count in sorted(source_tokens.bad_lines.items()):
            log.warning("%s: skipped %d line(s) with undecodable bytes", source.files[index].path, count)
        if source_tokens.split in ("train", HELD_OUT) and source_tokens.documents == 0 and "train" in splits:
            raise _empty_corpus(data_cfg)
        if source_tokens.split == HELD_OUT:
            source_tokens.held_out = held_out_mask(source_tokens.documents, data_cfg.validation_fraction, seed)
    totals = {"train": 0, "validation": 0}
    for source_tokens in tokens:
        for split, count in source_tokens.token_counts().items():
            totals[split] += count
    if "train" in splits and totals["train"] == 0:
        raise _empty_corpus(data_cfg)
    return totals


def _write(data_cfg, tokenizer, splits: Sequence[str], tokens, totals: dict, tmp: str) -> dict:
    """The blocks and info.json into `tmp`, synced; returns the info."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    body, dtype = data_cfg.seq_len - 2, token_dtype(len(tokenizer))
    blocks = {s: BlockFile(os.path.join(tmp, f"{s}.npy"), totals[s] // body, data_cfg.seq_len, dtype,
                           tokenizer.cls_token_id, tokenizer.sep_token_id) for s in splits}
    write_blocks(tokens, blocks)
    info = {"corpus": corpus_fingerprint(data_cfg), "seq_len": data_cfg.seq_len,
            "blocks": {s: f.n_blocks for s, f in blocks.items()}, "tokens": {s: totals[s] for s in splits},
            "documents": sum(t.documents for t in tokens), "num_proc": data_cfg.num_proc}
    with open(os.path.join(tmp, "info.json"), "w") as fh:
        json.dump(info, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return info


def _build(data_cfg, tokenizer, seed: int, splits: Sequence[str], folder: str) -> None:
    started = time.time()
    work = folder + ".work"
    os.makedirs(work, exist_ok=True)
    sources, tokens = _tokenize(data_cfg, tokenizer, splits, work)
    totals = _count(data_cfg, seed, splits, sources, tokens)
    for source in sources:  # the files read are the files planned: no edit slipped in meanwhile
        for corpus_file in source.files:
            corpus_file.check_unchanged()
    info = _write(data_cfg, tokenizer, splits, tokens, totals, folder + ".tmp")
    os.replace(folder + ".tmp", folder)  # the cache appears complete, or not at all
    shutil.rmtree(work)
    log.info("token blocks in %s: %s blocks of %d from %s tokens, %d documents, in %.0f s (data.num_proc=%d)",
             folder, info["blocks"], data_cfg.seq_len, info["tokens"], info["documents"], time.time() - started,
             data_cfg.num_proc)


def load_blocks(data_cfg, tokenizer, seed: int = 0, splits: Sequence[str] = SPLITS):
    """The requested splits (default: train, validation) as memory-mapped arrays, built once and cached."""
    folder = cache_folder(data_cfg, tokenizer, seed, splits)
    dist.rank0_first(lambda: prepare_blocks(data_cfg, tokenizer, seed, splits))
    arrays = tuple(np.load(os.path.join(folder, f"{s}.npy"), mmap_mode="r") for s in splits)
    if "train" in splits and len(arrays[splits.index("train")]) == 0:
        raise KDError(f"the training corpus yields no full block of data.seq_len={data_cfg.seq_len} "
                      f"tokens; use more text or a shorter seq_len")
    return arrays
