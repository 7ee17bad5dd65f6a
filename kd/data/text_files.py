"""Local .txt / .jsonl corpus files, cut into byte-range chunks that each process reads itself.

Document rules (the same as the first reader's):
- .txt: documents are separated by blank lines; a document's lines are stripped and joined by " ".
- .jsonl: one document per non-blank line, in its "text" field.
- a line with undecodable bytes raises (data.on_bad_bytes=error) or is skipped and counted (skip).

A file is cut into chunks of about CHUNK_BYTES at line ends, right after a blank line when one is
near, so tokenising processes read their chunks with plain reads: no process holds a whole file or
maps it into memory. A document that spans a cut comes in pieces; a continuing piece starts with the
joining space, so tokenising the pieces gives the tokens of the whole document for any tokenizer
that splits at whitespace first (WordPiece, BPE, SentencePiece). A single line is never cut: a
file that is one line of a gigabyte is read whole by one process.
"""
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

from kd.errors import KDError

CHUNK_BYTES = 1 << 20
WINDOW = 1 << 16                              # bytes searched at a time for a place to cut
BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # a blank line ends a document
VISIBLE = re.compile(rb"[!-~]")                # a line with one of these is not blank


@dataclass(frozen=True)
class CorpusFile:
    """A corpus file as it was when preparation started; any later change is an error."""
    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def stat(cls, path: str, key: str) -> "CorpusFile":
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise KDError(f"corpus file not found: {path}. Check {key}.") from None
        if not os.path.isfile(path):
            raise KDError(f"corpus path {path} is not a file. Check {key}.")
        return cls(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)

    @property
    def jsonl(self) -> bool:
        return self.path.endswith(".jsonl")

    def check_unchanged(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise KDError(f"corpus file {self.path} vanished while the corpus was being prepared; "
                          f"restore it and rerun (finished work is kept)") from None
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (self.size, self.mtime_ns, self.inode):
            raise KDError(f"corpus file {self.path} changed while the corpus was being prepared "
                          f"({self.size} -> {st.st_size} bytes); rerun once nothing writes to it")


def _cut_after(fh, target: int, size: int, jsonl: bool) -> Tuple[int, bool]:
    """(offset, starts_doc): the first place at or after `target` to end a chunk. Preferably right
    after a blank line, so the next chunk starts a document; else right after a line that is surely
    visible text (so the next chunk continues its document); the end of the file if neither comes."""
    pos = target - 1  # a newline just before target may open a blank line
    while pos < size:
        fh.seek(pos)
        window = fh.read(WINDOW)
        newlines = [m.start() for m in re.finditer(rb"\n", window)]
        if jsonl and newlines:
            return pos + newlines[0] + 1, True
        blank = BLANK_LINE.search(window)
        if blank:
            return pos + blank.end(), True
        for begin, end in zip(newlines, newlines[1:]):
            line = window[begin + 1:end]
            if VISIBLE.search(line) and _decodes(line):
                return pos + end + 1, False
        # go on from the last newline, so a line cut by the window's end is seen whole next time
        pos += newlines[-1] if newlines and newlines[-1] > 0 else len(window)
    return size, True


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def plan_chunks(file: CorpusFile, file_index: int) -> List[Dict]:
    """Rows of a datasets.Dataset: one per chunk, with everything needed to read it elsewhere."""
    chunks, start, starts_doc = [], 0, True
    with open(file.path, "rb") as fh:
        while start < file.size:
            if file.size - start <= CHUNK_BYTES:
                end, next_starts_doc = file.size, True
            else:
                end, next_starts_doc = _cut_after(fh, start + CHUNK_BYTES, file.size, file.jsonl)
            chunks.append({**asdict(file), "file": file_index, "start": start, "end": end,
                           "starts_doc": starts_doc})
            start, starts_doc = end, next_starts_doc
    return chunks


def _line_number(path: str, offset: int, line_in_chunk: int) -> int:
    """1-based line number of a chunk's line; counted only when an error needs it."""
    newlines = 0
    with open(path, "rb") as fh:
        while fh.tell() < offset:
            newlines += fh.read(min(1 << 24, offset - fh.tell())).count(b"\n")
    return newlines + line_in_chunk + 1


def read_chunk(chunk: Dict, on_bad_bytes: str) -> Tuple[List[str], List[bool], int]:
    """A chunk -> (document pieces, whether each starts a document, lines skipped for bad bytes)."""
    file = CorpusFile(chunk["path"], chunk["size"], chunk["mtime_ns"], chunk["inode"])
    file.check_unchanged()
    with open(file.path, "rb") as fh:
        fh.seek(chunk["start"])
        data = fh.read(chunk["end"] - chunk["start"])
    if len(data) != chunk["end"] - chunk["start"]:
        file.check_unchanged()  # shorter than planned: it changed
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the chunk ends at a line end: nothing after it
    pieces, new_doc, bad = [], [], 0
    current, current_new = [], chunk["starts_doc"]
    for number, raw in enumerate(lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if on_bad_bytes == "error":
                where = _line_number(file.path, chunk["start"], number)
                raise KDError(f"{file.path}:{where}: undecodable bytes ({err.reason}). Fix the file, or "
                              f"set data.on_bad_bytes=skip to skip and count such lines.") from None
            bad += 1
            continue
        if file.jsonl:
            if line.strip():
                pieces.append(_jsonl_text(line, file.path, chunk["start"], number))
                new_doc.append(True)
            continue
        text = line.strip()
        if text:
            current.append(text)
            continue
        if current:
            pieces.append(("" if current_new else " ") + " ".join(current))
            new_doc.append(current_new)
            current = []
        current_new = True
    if current:
        pieces.append(("" if current_new else " ") + " ".join(current))
        new_doc.append(current_new)
    return pieces, new_doc, bad


def _jsonl_text(line: str, path: str, offset: int, number: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise KDError(f"{path}:{_line_number(path, offset, number)}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict) or "text" not in row:
        raise KDError(f"{path}:{_line_number(path, offset, number)}: each JSONL row needs a \"text\" field")
    return str(row["text"])
