"""Pretraining corpus sources as `datasets` rows: which rows to tokenise, and where their documents go.

Sources: the Hugging Face hub (WikiText-103 for real runs), local .txt/.jsonl files (read in chunks
by the tokenising processes, kd/data/text_files.py), and the Wikipedia sample that ships inside
gensim (offline demo and tests). None of them is ever held in a Python list: the hub's splits and
the sample are Arrow files on disk, and local files are described by their chunks.
"""
import array
import bz2
import os
import random
from dataclasses import dataclass, field
from typing import Iterator, List, Sequence

import numpy as np

from kd import assets
from kd.data.text_files import CorpusFile, plan_chunks
from kd.errors import KDError
from kd.hub import hub_error, prepare_hub_access

HELD_OUT = "held_out"  # a source whose documents are split by data.validation_fraction


@dataclass
class DocumentSource:
    """Rows to tokenise: text rows (hub, sample) or chunk rows (local files), and where they go."""
    name: str                     # for messages and progress bars
    rows: object                  # datasets.Dataset
    split: str                    # "train", "validation" or HELD_OUT
    files: List[CorpusFile] = field(default_factory=list)  # local files; must not change meanwhile


def hub_dataset_error(dataset: str, config: str, err: Exception) -> KDError:
    return hub_error(f"dataset '{dataset}/{config}'", err,
                     "For the offline pipeline use --config configs/demo.yaml (data.source=wiki_sample), "
                     "or data.source=text with local files.")


def load_hub_split(dataset: str, config: str, split: str, streaming: bool = False):
    """One split of a hub dataset: Arrow files in the datasets cache, or a stream."""
    import datasets
    prepare_hub_access()
    try:
        splits = datasets.load_dataset(dataset, config, streaming=streaming)
    except Exception as err:  # offline: ConnectionError / OSError / DatasetNotFoundError
        raise hub_dataset_error(dataset, config, err) from None
    if split not in splits:
        raise KDError(f"dataset '{dataset}/{config}' has no {split} split (it has {list(splits)}); "
                      f"use data.source=text with data.train_files and data.validation_files")
    return splits[split]


def iter_wiki_sample_articles() -> Iterator[str]:
    """Plain text of the real Wikipedia articles bundled with gensim (markup stripped), one by one."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    with bz2.open(assets.wiki_sample_path(), "rb") as fh:
        for _title, text, _pageid in extract_pages(fh):
            plain = filter_wiki(text).replace("'''", "").replace("''", '"')
            # Keep paragraph text; drop the blank-line noise and residual table/heading lines.
            paragraphs = [p.strip() for p in plain.split("\n") if len(p.strip()) > 40]
            if paragraphs:
                yield "\n".join(paragraphs)


def wiki_sample_articles() -> List[str]:
    """The sample's 107 articles (3 MB) as a list, for tests and the bench's text generator."""
    return list(iter_wiki_sample_articles())


def _wiki_sample_rows():
    for article in iter_wiki_sample_articles():
        yield {"text": article}


def held_out_mask(n_docs: int, validation_fraction: float, seed: int) -> np.ndarray:
    """Which documents are held out: whole documents (not blocks), so validation text is never seen
    in training. The draw is random.Random(seed).shuffle's, as the first reader made it, on a
    compact array: one byte per document is kept."""
    n_val = max(1, round(n_docs * validation_fraction))
    if n_val >= n_docs:
        raise KDError(f"only {n_docs} document(s): too few to hold out a validation split; "
                      f"add data or give data.validation_files")
    order = array.array("q", range(n_docs))
    rng = random.Random(seed)
    for i in range(n_docs - 1, 0, -1):  # random.shuffle's loop: randrange(i + 1) is its _randbelow
        j = rng.randrange(i + 1)
        order[i], order[j] = order[j], order[i]
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.frombuffer(order, dtype=np.int64)[:n_val]] = True
    return mask


def corpus_files(data_cfg, key: str) -> List[CorpusFile]:
    return [CorpusFile.stat(f, f"data.{key}") for f in getattr(data_cfg, key)]


def file_source(name: str, files: List[CorpusFile], split: str) -> DocumentSource:
    import datasets
    chunks = [c for i, f in enumerate(files) for c in plan_chunks(f, i)]
    rows = datasets.Dataset.from_list(chunks) if chunks else datasets.Dataset.from_dict({"start": []})
    return DocumentSource(name, rows, split, files)


def document_sources(data_cfg, splits: Sequence[str], work_dir: str) -> List[DocumentSource]:
    """The sources of the requested splits ("train", "validation"), in the order blocks are written."""
    import datasets
    if data_cfg.source == "hub":
        return [DocumentSource(f"{data_cfg.hub_dataset} {s}", load_hub_split(data_cfg.hub_dataset,
                               data_cfg.hub_config, s), s) for s in splits]
    if data_cfg.source == "wiki_sample":
        rows = datasets.Dataset.from_generator(_wiki_sample_rows, cache_dir=os.path.join(work_dir, "wiki_sample"))
        return [DocumentSource("the Wikipedia sample", rows, HELD_OUT)]
    if not data_cfg.validation_files:
        return [file_source("data.train_files", corpus_files(data_cfg, "train_files"), HELD_OUT)]
    names = {"train": "train_files", "validation": "validation_files"}
    return [file_source(f"data.{names[s]}", corpus_files(data_cfg, names[s]), s) for s in splits]


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
