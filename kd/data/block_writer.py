"""Token rows (Arrow files) -> the (n_blocks, seq_len) .npy arrays that training memory-maps.

The rows are read back batch by batch with plain reads (pyarrow IPC streams, not memory maps, so
the pages read do not stay in this process's memory), routed to train or validation by document,
and cut into `[CLS] body [SEP]` blocks that are written front to back. Nothing is held whole: a
first pass counts documents and tokens (the .npy header needs the block count), a second writes.
"""
import errno
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kd.data.corpus import HELD_OUT
from kd.errors import KDError
from kd.integrity import space_note

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_error(path: str, what: str, needed_bytes: int, err: OSError) -> KDError:
    """One line naming the file, what it holds, the space it needs and the fix."""
    if err.errno == errno.EFBIG:
        why, fix = "it would pass this process's file size limit (ulimit -f)", "raise the limit"
    else:
        why, fix = "no space left on the disk", "free space or set data.cache_dir to a bigger disk"
    return KDError(f"could not write {path}: {why}. The {what}: {space_note(path, needed_bytes)}; {fix}, then rerun")


class BlockFile:
    """A (n_blocks, seq_len) .npy file written block by block; the tail short of a block is dropped."""

    def __init__(self, path: str, n_blocks: int, seq_len: int, dtype: np.dtype, cls_id: int, sep_id: int):
        self.path, self.n_blocks, self.seq_len, self.dtype = path, n_blocks, seq_len, np.dtype(dtype)
        self.cls_id, self.sep_id = cls_id, sep_id
        self.needed = 128 + n_blocks * seq_len * self.dtype.itemsize
        self.written = 0
        self.carry = np.zeros(0, dtype=self.dtype)
        self.fh = open(path, "wb")
        self._guarded(np.lib.format.write_array_header_1_0, self.fh,
                      {"descr": self.dtype.str, "fortran_order": False, "shape": (n_blocks, seq_len)})

    def _guarded(self, write, *args) -> None:
        try:
            write(*args)
        except OSError as err:
            if err.errno in DISK_FULL:
                raise disk_full_error(self.path, "token blocks", self.needed, err) from None
            raise

    def add(self, tokens: np.ndarray) -> None:
        body = self.seq_len - 2
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        full = min(len(stream) // body, self.n_blocks - self.written)
        if full:
            blocks = np.empty((full, self.seq_len), dtype=self.dtype)
            blocks[:, 0] = self.cls_id
            blocks[:, -1] = self.sep_id
            blocks[:, 1:-1] = stream[:full * body].reshape(full, body)
            self._guarded(self.fh.write, memoryview(blocks).cast("B"))
            self.written += full
        self.carry = np.array(stream[full * body:], dtype=self.dtype)

    def close(self) -> None:
        if self.written != self.n_blocks:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.n_blocks} blocks")
        self._guarded(self.fh.flush)
        self._guarded(os.fsync, self.fh.fileno())
        self.fh.close()


def token_batches(files: List[str]) -> Iterator[pa.RecordBatch]:
    for path in files:
        with pa.OSFile(path) as source:
            yield from pa.ipc.open_stream(source)


@dataclass
class SourceTokens:
    """One source's token files and, after counting, which of its documents are held out."""
    files: List[str]
    split: str                               # "train", "validation" or HELD_OUT
    documents: int = 0
    held_out: Optional[np.ndarray] = None    # bool per document, for HELD_OUT sources
    bad_lines: Dict[int, int] = field(default_factory=dict)

    def batches(self) -> Iterator[Tuple[np.ndarray, pa.RecordBatch]]:
        """(split of each row: True = validation, batch). Rows before a source's first document
        (only possible for an empty piece that carries a skipped-line count) hold no tokens."""
        docs_before = 0
        for batch in token_batches(self.files):
            new_doc = batch.column("new_doc").to_numpy(zero_copy_only=False)
            doc = docs_before + np.cumsum(new_doc) - 1
            docs_before += int(new_doc.sum())
            if self.split == HELD_OUT and self.held_out is not None:
                to_validation = self.held_out[np.maximum(doc, 0)]
            else:
                to_validation = np.full(len(doc), self.split == "validation")
            yield to_validation, batch

    def count_documents(self) -> None:
        for batch in token_batches(self.files):
            self.documents += int(pc.sum(batch.column("new_doc").cast(pa.int64())).as_py() or 0)
            files = batch.column("file").to_numpy()
            bad = batch.column("bad_lines").to_numpy()
            for index in np.unique(files[bad > 0]):
                self.bad_lines[int(index)] = self.bad_lines.get(int(index), 0) + int(bad[files == index].sum())

    def token_counts(self) -> Dict[str, int]:
        counts = {"train": 0, "validation": 0}
        for to_validation, batch in self.batches():
            lengths = pc.list_value_length(batch.column("ids")).to_numpy(zero_copy_only=False)
            counts["validation"] += int(lengths[to_validation].sum())
            counts["train"] += int(lengths[~to_validation].sum())
        return counts


def write_blocks(sources: List[SourceTokens], files: Dict[str, BlockFile]) -> None:
    """Every requested split's tokens, in source order, into its BlockFile."""
    for source in sources:
        for to_validation, batch in source.batches():
            for split, rows in (("train", ~to_validation), ("validation", to_validation)):
                if split in files and rows.any():
                    ids = pc.filter(batch.column("ids"), pa.array(rows)).flatten()
                    files[split].add(ids.to_numpy(zero_copy_only=False))
    for block_file in files.values():
        block_file.close()
