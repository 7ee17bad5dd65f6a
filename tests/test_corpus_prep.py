"""Corpus preparation through `datasets`: the same blocks as the first path, chunked files and worker
processes, the cache key, faults (files that change or vanish, a full disk, half-written caches)."""
import errno
import json
import os
import random
import resource

import numpy as np
import pytest

from kd.config import PretrainConfig, load_config
from kd.data import block_writer, blocks as blocks_mod, text_files, tokenizing
from kd.data.blocks import cache_key, load_blocks
from kd.data.corpus import held_out_mask, wiki_sample_articles
from kd.data.legacy import legacy_blocks
from kd.errors import KDError
from tests.conftest import PY, run_script


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from kd.models import load_tokenizer
    return load_tokenizer(tokenizer_dir)


def data_cfg(cache, *files, **extra):
    items = {"run_name": "x", "data.cache_dir": str(cache), "data.seq_len": 64, "data.validation_fraction": 0.2,
             **({"data.source": "text", "data.train_files": f"[{','.join(map(str, files))}]"} if files else {}),
             **extra}
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in items.items()]).data


@pytest.fixture(scope="module")
def paragraphs_file(tmp_path_factory):
    """Real Wikipedia paragraphs as short documents, with a CRLF line, stray blank lines and a long one."""
    folder = tmp_path_factory.mktemp("paragraphs")
    docs = [p for a in wiki_sample_articles()[:6] for p in a.split("\n")]
    docs[3] = docs[3] + "\r\n" + docs[4]            # a two-line document with a CRLF line end
    docs[7] = "\n".join(docs[7:20])                # a document far longer than the test chunks
    path = folder / "paragraphs.txt"
    path.write_text("\n\n".join(docs[:7] + docs[7:8] + docs[20:]) + "\n\n  \n", encoding="utf-8")
    return path


def same_blocks(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_the_packaged_sample_gives_the_first_paths_blocks(tmp_path, tok):
    cfg = data_cfg(tmp_path, **{"data.source": "wiki_sample", "data.seq_len": 128, "data.validation_fraction": 0.05})
    new = load_blocks(cfg, tok, 0)
    assert [len(b) for b in new] == [4671, 200] and new[0].dtype == np.uint16
    assert same_blocks(new, legacy_blocks(cfg, tok, 0))


@pytest.mark.parametrize("suffix", ["txt", "jsonl"])
def test_chunked_files_and_worker_processes_give_the_first_paths_blocks(tmp_path, tok, paragraphs_file,
                                                                      monkeypatch, suffix):
    path = paragraphs_file
    if suffix == "jsonl":
        path = tmp_path / "docs.jsonl"
        docs = paragraphs_file.read_text(encoding="utf-8").split("\n\n")
        path.write_text("".join(json.dumps({"text": d}) + "\n" + ("\n" if i % 5 == 0 else "")
                                for i, d in enumerate(docs)), encoding="utf-8")
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 3000)  # planning is in this process: many chunks
    monkeypatch.setattr(text_files, "WINDOW", 512)
    corpus = text_files.CorpusFile.stat(str(path), "data.train_files")
    chunks = text_files.plan_chunks(corpus, 0)
    assert len(chunks) > 20 and chunks[-1]["end"] == os.path.getsize(path)
    assert any(not c["starts_doc"] for c in chunks) or suffix == "jsonl"  # a document cut between chunks
    old = legacy_blocks(data_cfg(tmp_path, path), tok, 0)
    for num_proc in (1, 2):
        cfg = data_cfg(tmp_path / f"np{num_proc}", path, **{"data.num_proc": num_proc})
        assert same_blocks(load_blocks(cfg, tok, 0), old), num_proc


def test_held_out_documents_are_random_shuffles_draw(tmp_path):
    for n, fraction, seed in ((7, 0.2, 0), (110, 0.05, 0), (1000, 0.1, 3)):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        expected = np.zeros(n, dtype=bool)
        expected[order[:max(1, round(n * fraction))]] = True
        assert np.array_equal(held_out_mask(n, fraction, seed), expected)
    with pytest.raises(KDError, match="only 1 document"):
        held_out_mask(1, 0.2, 0)


def test_the_cache_key_covers_what_changes_the_bytes_and_not_num_proc(tmp_path, tok, corpus_file):
    base = cache_key(data_cfg(tmp_path, corpus_file), tok, 0)
    assert cache_key(data_cfg(tmp_path, corpus_file, **{"data.num_proc": 4}), tok, 0) == base
    for change in ({"data.seq_len": 32}, {"data.on_bad_bytes": "error"}, {"data.validation_fraction": 0.3}):
        assert cache_key(data_cfg(tmp_path, corpus_file, **change), tok, 0) != base, change
    assert cache_key(data_cfg(tmp_path, corpus_file), tok, 1) != base           # the split seed
    assert cache_key(data_cfg(tmp_path, corpus_file), tok, 0, ("validation",)) != base
    copy = tmp_path / "copy.txt"
    copy.write_bytes(open(corpus_file, "rb").read())
    first = cache_key(data_cfg(tmp_path, copy), tok, 0)
    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 1000))  # same second, same size
    assert cache_key(data_cfg(tmp_path, copy), tok, 0) != first


def _fail_after_first_chunk(monkeypatch, action):
    real, calls = text_files.read_chunk, []

    def read_then_act(chunk, on_bad_bytes):
        calls.append(chunk["start"])
        if len(calls) == 2:
            action(chunk["path"])
        return real(chunk, on_bad_bytes)
    monkeypatch.setattr(tokenizing, "read_chunk", read_then_act)
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 20000)


def test_a_file_that_changes_during_preparation_is_a_clear_error(tmp_path, tok, paragraphs_file, monkeypatch):
    path = tmp_path / "growing.txt"
    path.write_bytes(paragraphs_file.read_bytes())
    _fail_after_first_chunk(monkeypatch, lambda p: open(p, "a").write("\n\nmore text\n"))
    with pytest.raises(KDError, match=f"corpus file {path} changed while the corpus was being prepared"):
        load_blocks(data_cfg(tmp_path, path), tok, 0)


def test_a_file_that_vanishes_during_preparation_is_a_clear_error(tmp_path, tok, paragraphs_file, monkeypatch):
    path = tmp_path / "doomed.txt"
    path.write_bytes(paragraphs_file.read_bytes())
    _fail_after_first_chunk(monkeypatch, os.remove)
    with pytest.raises(KDError, match=f"corpus file {path} vanished while the corpus was being prepared"):
        load_blocks(data_cfg(tmp_path, path), tok, 0)


def test_a_full_disk_while_blocks_are_written_names_the_path_and_the_space(tmp_path, tok, corpus_file, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, path):
            self.fh, self.written = real_open(path, "wb"), 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)
    monkeypatch.setattr(block_writer, "open", lambda path, mode: FullDisk(path), raising=False)
    cfg = data_cfg(tmp_path, corpus_file)
    with pytest.raises(KDError) as err:
        load_blocks(cfg, tok, 0)
    message = str(err.value)
    assert "\n" not in message and "no space left on the disk" in message
    assert f"{cfg.cache_dir}/blocks-" in message and "train.npy" in message and " MB needed, " in message
    monkeypatch.undo()  # the disk has room again: a rerun finishes, and nothing half-written was kept
    assert same_blocks(load_blocks(cfg, tok, 0), load_blocks(data_cfg(tmp_path / "clean", corpus_file), tok, 0))


def test_a_file_size_limit_fails_prepare_only_with_one_line(tmp_path, corpus_file):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    args = [PY, "ddp_main.py", "--config", "configs/demo_teacher.yaml", "--prepare-only", "data.source=text",
            f"data.train_files=[{corpus_file}]", f"data.cache_dir={tmp_path}", "data.seq_len=64"]
    import subprocess
    from tests.conftest import ROOT
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"could not write {tmp_path}/blocks-" in error[0] and "file size limit (ulimit -f)" in error[0]
    assert " MB needed, " in error[0] and "raise the limit" in error[0]


def test_a_half_written_cache_is_never_taken_and_a_rerun_finishes_it(tmp_path, tok, corpus_file, monkeypatch):
    cfg = data_cfg(tmp_path, corpus_file)
    real_add = block_writer.BlockFile.add

    def crash(self, tokens):
        real_add(self, tokens)
        raise KeyboardInterrupt  # killed while writing
    monkeypatch.setattr(block_writer.BlockFile, "add", crash)
    with pytest.raises(KeyboardInterrupt):
        load_blocks(cfg, tok, 0)
    folder = blocks_mod.cache_folder(cfg, tok, 0)
    assert not os.path.exists(folder) and os.path.isdir(folder + ".tmp") and os.listdir(folder + ".work")
    monkeypatch.undo()
    tokenised = []
    real_call = tokenizing.RowTokenizer.__call__
    monkeypatch.setattr(tokenizing.RowTokenizer, "__call__", lambda self, b: tokenised.append(1) or real_call(self, b))
    rerun = load_blocks(cfg, tok, 0)
    assert tokenised == []  # the rerun reused the finished tokenising and only wrote the blocks
    assert not os.path.exists(folder + ".work") and not os.path.exists(folder + ".tmp")
    assert same_blocks(rerun, legacy_blocks(cfg, tok, 0))
    os.remove(os.path.join(folder, "validation.npy"))  # a cache damaged by hand is built again
    assert same_blocks(load_blocks(cfg, tok, 0), rerun)


def test_bad_jsonl_and_empty_corpora_are_clear_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(KDError, match=f"{bad}:4: each JSONL row needs a \"text\" field"):
        load_blocks(data_cfg(tmp_path, bad), tok, 0)
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(KDError, match=f"{bad}:2: not valid JSON"):
        load_blocks(data_cfg(tmp_path, bad), tok, 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(KDError, match="the training corpus is empty"):
        load_blocks(data_cfg(tmp_path, empty), tok, 0)


def test_prepare_only_builds_the_cache_without_loading_the_teacher(tmp_path, tokenizer_dir, corpus_file):
    result = run_script([PY, "ddp_main.py", "--prepare-only", "run_name=prep", "teacher.name=/nowhere/teacher",
                         f"data.tokenizer={tokenizer_dir}", "data.source=text", f"data.train_files=[{corpus_file}]",
                         "data.seq_len=64", "data.validation_fraction=0.2", f"data.cache_dir={tmp_path / 'cache'}",
                         f"checkpoint_dir={tmp_path / 'ckpt'}", "data.num_proc=2"])
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    [folder] = [d for d in os.listdir(tmp_path / "cache") if d.startswith("blocks-") and "." not in d]
    info = json.loads((tmp_path / "cache" / folder / "info.json").read_text())
    assert info["blocks"]["train"] > 0 and info["num_proc"] == 2 and f"prepared {tmp_path / 'cache'}" in result.stdout
    assert not os.path.exists(tmp_path / "ckpt")  # no training started


def test_a_script_without_a_main_guard_fails_instead_of_hanging(tmp_path, tokenizer_dir, corpus_file):
    """With data.num_proc > 1 the workers are spawned and run the main script again."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from kd.config import PretrainConfig, load_config\n"
        "from kd.data.blocks import load_blocks\n"
        "from kd.models import load_tokenizer\n"
        f"cfg = load_config(PretrainConfig, None, ['run_name=x', 'data.source=text', 'data.train_files=[{corpus_file}]',"
        f" 'data.cache_dir={tmp_path / 'cache'}', 'data.num_proc=2'])\n"
        f"load_blocks(cfg.data, load_tokenizer('{tokenizer_dir}'))\n")
    from tests.conftest import ROOT
    result = run_script([PY, str(script)], env_extra={"PYTHONPATH": ROOT}, timeout=300)
    assert result.returncode != 0
    assert "put the script's code under `if __name__ == \"__main__\":`" in result.stderr


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A hub dataset as load_dataset gives it (Arrow files on disk), WikiText-style: one row per line,
    empty rows between paragraphs; load_dataset answers with it instead of the network."""
    import datasets
    lines = [x for a in wiki_sample_articles()[:8] for p in a.split("\n") for x in (p, "")]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines[60:]}),
                                   "validation": datasets.Dataset.from_dict({"text": lines[:60]})})
    splits.save_to_disk(str(tmp_path / "hub"))
    on_disk = datasets.load_from_disk(str(tmp_path / "hub"))
    asked = []

    def load_dataset(name, config, streaming=False):
        asked.append((name, config, streaming))
        if streaming:
            return datasets.IterableDatasetDict({k: v.to_iterable_dataset(num_shards=4) for k, v in on_disk.items()})
        return on_disk
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return lines, asked


def test_hub_rows_give_the_first_paths_blocks(tmp_path, tok, fake_hub):
    from kd.data.legacy import tokenize_to_blocks
    lines, asked = fake_hub
    for num_proc in (1, 2):
        cfg = data_cfg(tmp_path / f"np{num_proc}", **{"data.source": "hub", "data.num_proc": num_proc})
        train, val = load_blocks(cfg, tok, 0)
        assert np.array_equal(train, tokenize_to_blocks(lines[60:], tok, 64))
        assert np.array_equal(val, tokenize_to_blocks(lines[:60], tok, 64))
    assert asked[0] == ("wikitext", "wikitext-103-raw-v1", False)
