"""data.streaming=true: training blocks built on the fly from a `datasets` stream.

For corpora that do not fit on disk as blocks. The documents come from `datasets` streaming (the
hub's train split, or local files read chunk by chunk), each DDP rank reading its own shard
(`datasets.distributed.split_dataset_by_node`). They are tokenised and packed into the same
`[CLS] ... [SEP]` blocks as the block cache, in stream order; a rank that finishes its shard starts
it again, so ranks never wait for each other at an epoch's end.

The position is exact and small: the stream's state before the current document, the tokens
carried over from earlier documents, and how many blocks of the current document were taken. The
engine saves every rank's position in the checkpoint, and a resumed run reads on from there.
"""
import copy
import logging
from typing import Callable, Iterator, List

import numpy as np
import torch

from kd.data.corpus import corpus_files, load_hub_split
from kd.data.text_files import plan_chunks, read_chunk
from kd.data.tokenizing import backend_tokenizer
from kd.errors import KDError

log = logging.getLogger(__name__)


def _chunk_documents(chunks: List[dict], on_bad_bytes: str) -> Iterator[dict]:
    for chunk in chunks:
        pieces, _starts, skipped = read_chunk(chunk, on_bad_bytes)
        if skipped:
            log.warning("%s: skipped %d line(s) with undecodable bytes (bytes %d-%d)", chunk["path"], skipped,
                        chunk["start"], chunk["end"])
        for text in pieces:
            yield {"text": text}


def document_stream_factory(data_cfg, rank: int, world_size: int) -> Callable:
    """A function that returns this rank's document stream, ready to iterate from its start."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node
    if data_cfg.source == "hub":
        def make():
            stream = load_hub_split(data_cfg.hub_dataset, data_cfg.hub_config, "train", streaming=True)
            return split_dataset_by_node(stream.select_columns(["text"]), rank, world_size)
        return make
    files = corpus_files(data_cfg, "train_files")
    chunks = [c for i, f in enumerate(files) for c in plan_chunks(f, i)]  # once: planning reads the files

    def make():
        stream = IterableDataset.from_generator(_chunk_documents, gen_kwargs={
            "chunks": chunks, "on_bad_bytes": data_cfg.on_bad_bytes})  # list kwargs are the shards
        return split_dataset_by_node(stream, rank, world_size)
    return make


class StreamedBlocks:
    """Masked batches of blocks from a document stream: endless, with a position that `state_dict`
    gives and `load_state_dict` restores exactly (the engine treats any loader with these as a stream)."""

    def __init__(self, make_documents: Callable, tokenizer, seq_len: int, batch_size: int, collate,
                 rank: int = 0, world_size: int = 1):
        self.make_documents, self.collate = make_documents, collate
        self.backend = backend_tokenizer(tokenizer)
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.position = {"documents": None, "carry": [], "taken": 0, "blocks": 0, "passes": 0}

    def state_dict(self) -> dict:
        return copy.deepcopy(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = copy.deepcopy(state)

    def _block(self, body: np.ndarray) -> torch.Tensor:
        block = np.empty(self.seq_len, dtype=np.int64)
        block[0], block[-1], block[1:-1] = self.cls_id, self.sep_id, body
        return torch.from_numpy(block)

    def _blocks(self) -> Iterator[tuple]:
        """(block index, block), forever; `self.position` always says how to resume after the last one."""
        pos, body = self.position, self.seq_len - 2
        while True:
            blocks_at_pass_start = pos["blocks"]
            documents = self.make_documents()
            if pos["documents"] is not None:
                documents.load_state_dict(pos["documents"])
            before = pos["documents"]  # the stream's state before the document in hand
            for row in documents:
                carry = pos["carry"]
                tokens = np.concatenate([np.asarray(carry, dtype=np.int64), np.asarray(
                    self.backend.encode(row["text"] or "", add_special_tokens=False).ids, dtype=np.int64)])
                full = len(tokens) // body
                for k in range(pos["taken"], full):  # taken > 0 only right after a resume
                    pos.update(documents=before, carry=carry, taken=k + 1)
                    index = pos["blocks"] * self.world_size + self.rank  # distinct on every rank: mask seeds
                    pos["blocks"] += 1
                    yield index, self._block(tokens[k * body:(k + 1) * body])
                before = documents.state_dict()
                pos.update(documents=before, carry=tokens[full * body:].tolist(), taken=0)
            if pos["blocks"] == blocks_at_pass_start:
                raise KDError(f"rank {self.rank}'s share of the training stream yields no full block of "
                              f"data.seq_len={self.seq_len} tokens; use more text or fewer processes")
            pos.update(documents=None, carry=[], taken=0, passes=pos["passes"] + 1)  # the tail is dropped
            log.info("rank %d finished pass %d over its share of the training stream", self.rank, pos["passes"])

    def __iter__(self):
        blocks = self._blocks()
        while True:
            items = [next(blocks) for _ in range(self.batch_size)]
            yield self.collate(items)
