"""Document rows -> token rows, with `datasets.Dataset.map(batched=True, num_proc=data.num_proc)`.

Rows in: text rows (hub datasets, the Wikipedia sample) or chunk rows of local files, which each
process reads itself (kd/data/text_files.py). Rows out, written by `datasets` to Arrow files:
    ids        token ids of one document piece, without special tokens (uint16 when the vocab fits)
    new_doc    whether the piece starts a document (the held-out split is drawn over documents)
    bad_lines  lines of this chunk skipped for undecodable bytes; file: which file (for the warning)

Worker processes are spawned, not forked: a forked worker would start as a copy of the parent (a
training process holds torch and maybe a teacher), and every copy counts in the memory of the
process tree. A spawned one imports only `datasets`, `tokenizers` and this module.
"""
import contextlib
import json
import os
from itertools import chain
from typing import List

import numpy as np
import pyarrow as pa

from kd.data.text_files import read_chunk
from kd.errors import KDError

TEXT_ROWS_PER_BATCH = 256   # hub rows and sample articles per map call
CHUNKS_PER_BATCH = 2        # chunk rows (up to ~1 MB of text each) per map call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2 ** 16 else np.dtype(np.int32)


def backend_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` inside a fast HF tokenizer, without truncation or padding."""
    if not getattr(tokenizer, "is_fast", False):
        raise KDError(f"the tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; corpus "
                      f"preparation needs one: save it with tokenizer.json, or pick one that has it")
    from tokenizers import Tokenizer
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def pipeline_fingerprint(tokenizer) -> dict:
    """The parts of the tokenizer that decide the ids: normaliser, pre-tokeniser, model, added tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}


class RowTokenizer:
    """The `map` function. Picklable: workers get a copy of the Rust tokenizer, nothing else."""

    def __init__(self, tokenizer, on_bad_bytes: str):
        self.backend = backend_tokenizer(tokenizer)
        self.dtype = token_dtype(len(tokenizer))
        self.on_bad_bytes = on_bad_bytes

    def __call__(self, batch: dict) -> pa.Table:
        if "text" in batch:
            texts = [t or "" for t in batch["text"]]
            new_doc, bad, files = [True] * len(texts), [0] * len(texts), [-1] * len(texts)
        else:
            texts, new_doc, bad, files = [], [], [], []
            for chunk in ({k: batch[k][i] for k in batch} for i in range(len(batch["start"]))):
                pieces, starts, skipped = read_chunk(chunk, self.on_bad_bytes)
                if skipped and not pieces:  # keep the count: an empty piece that starts nothing
                    pieces, starts = [""], [False]
                texts += pieces
                new_doc += starts
                bad += [skipped] + [0] * (len(pieces) - 1) if pieces else []
                files += [chunk["file"]] * len(pieces)
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))
        offsets = np.zeros(len(encodings) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=self.dtype, count=int(offsets[-1]))
        return pa.table({"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), "new_doc": pa.array(new_doc, pa.bool_()),
                         "bad_lines": pa.array(bad, pa.int64()), "file": pa.array(files, pa.int32())})


@contextlib.contextmanager
def spawned_workers():
    """datasets starts its pool from multiprocess's default context: make that spawn, for this block."""
    import multiprocess
    previous = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(previous, force=True)


def tokenize_source(rows, row_tokenizer: RowTokenizer, num_proc: int, out_path: str, desc: str) -> List[str]:
    """Tokenise `rows` into Arrow files (in order) at `out_path` (suffixed per worker). A rerun after
    an interruption reuses the worker files that were finished: datasets moves each into place whole."""
    if len(rows) == 0:
        return []
    chunk_rows = "start" in rows.column_names
    workers = num_proc if num_proc > 1 else None  # 1: in this process
    with spawned_workers():
        out = rows.map(row_tokenizer, batched=True,
                       batch_size=CHUNKS_PER_BATCH if chunk_rows else TEXT_ROWS_PER_BATCH,
                       num_proc=workers, remove_columns=rows.column_names, cache_file_name=out_path,
                       new_fingerprint=os.path.basename(out_path).replace(".arrow", ""), desc=desc)
    return [f["filename"] for f in out.cache_files]
