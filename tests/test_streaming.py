"""data.streaming=true: blocks built on the fly, each rank its own shard, exact resume from a checkpoint."""
import json
import os
import shutil
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from kd.config import PretrainConfig, load_config
from kd.data import text_files
from kd.data.corpus import wiki_sample_articles
from kd.data.streaming import StreamedBlocks, document_stream_factory
from kd.errors import KDError
from kd.pretrain import run_pretraining
from tests.conftest import TORCHRUN, run_script, tiny_overrides


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory):
    """Paragraphs of real Wikipedia as short documents: a block often spans several of them."""
    folder = tmp_path_factory.mktemp("stream")
    paragraphs = [p for a in wiki_sample_articles()[:14] for p in a.split("\n")]
    (folder / "train.txt").write_text("\n\n".join(paragraphs[40:]), encoding="utf-8")
    (folder / "val.txt").write_text("\n\n".join(paragraphs[:40]), encoding="utf-8")
    return folder / "train.txt", folder / "val.txt"


def stream_overrides(tmp_path, teacher, files, cache, **extra):
    return tiny_overrides(tmp_path, teacher, files[0], cache, **{
        "data.streaming": "true", "data.validation_files": f"[{files[1]}]", **extra})


def data_cfg(files, **extra):
    items = {"run_name": "x", "data.source": "text", "data.train_files": f"[{files[0]}]",
             "data.validation_files": f"[{files[1]}]", "data.seq_len": 64, "data.streaming": "true", **extra}
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in items.items()]).data


def blocks_of(stream, count):
    return [(i, b.tolist()) for i, b in islice(stream._blocks(), count)]


def test_a_position_resumes_at_exactly_the_next_block(stream_files, tokenizer_dir, monkeypatch):
    from kd.models import load_tokenizer
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 8000)  # several shards, so the stream state moves on
    tok = load_tokenizer(tokenizer_dir)
    make = document_stream_factory(data_cfg(stream_files), 0, 1)
    straight = blocks_of(StreamedBlocks(make, tok, 64, 4, None), 3000)  # past the end of a pass
    assert len({tuple(b) for _, b in straight}) > 1000
    for stop in (0, 1, 7, 150, 1400, 2500):
        first = StreamedBlocks(make, tok, 64, 4, None)
        taken = blocks_of(first, stop)
        position = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
        resumed = StreamedBlocks(make, tok, 64, 4, None)
        resumed.load_state_dict(position)
        assert taken + blocks_of(resumed, 200) == straight[:stop + 200], stop
    assert position["passes"] == 1 and position["documents"] is not None


def test_each_rank_reads_its_own_share_of_the_documents(stream_files, monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 8000)
    cfg = data_cfg(stream_files)
    everything = [r["text"] for r in document_stream_factory(cfg, 0, 1)()]
    shares = [[r["text"] for r in document_stream_factory(cfg, rank, 2)()] for rank in (0, 1)]
    assert all(len(s) > 0.3 * len(everything) for s in shares)
    assert sorted(shares[0] + shares[1]) == sorted(everything) and not set(shares[0]) & set(shares[1])


def test_a_streamed_run_resumes_to_the_same_weights(tmp_path, tiny_teacher_dir, stream_files, shared_cache,
                                                   monkeypatch):
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 8000)

    def run(run_name, **kw):
        cfg = load_config(PretrainConfig, None, stream_overrides(tmp_path, tiny_teacher_dir, stream_files, shared_cache,
                                                                 run_name=run_name, steps=8, **kw))
        return run_pretraining(cfg)
    run("straight", **{"train.save_every": 0, "train.resume": "none"})
    run("halted", **{"train.save_every": 5})
    ckpt = tmp_path / "ckpt" / "halted"
    [position] = json.loads((ckpt / "step_000005" / "state.json").read_text())["data_position"]
    assert position["documents"] is not None and position["blocks"] == 20
    for name in os.listdir(ckpt):  # as if killed right after the step-5 checkpoint
        if name != "step_000005":
            shutil.rmtree(ckpt / name) if (ckpt / name).is_dir() else os.remove(ckpt / name)
    run("halted", **{"train.save_every": 5, "train.resume": "auto"})
    straight, resumed = (load_file(tmp_path / "ckpt" / r / "final" / "model.safetensors") for r in ("straight", "halted"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_two_ranks_stream_and_resume_under_torchrun(tmp_path, tiny_teacher_dir, stream_files, shared_cache):
    def run(run_name, **kw):
        args = [TORCHRUN, "--standalone", "--nproc_per_node=2", "ddp_main.py",
                *stream_overrides(tmp_path, tiny_teacher_dir, stream_files, shared_cache, run_name=run_name,
                                  steps=6, **kw)]
        result = run_script(args)
        assert result.returncode == 0, result.stderr[-3000:]
    run("ddp-straight", **{"train.save_every": 0, "train.resume": "none"})
    run("ddp-halted", **{"train.save_every": 3})
    ckpt = tmp_path / "ckpt" / "ddp-halted"
    positions = json.loads((ckpt / "step_000003" / "state.json").read_text())["data_position"]
    assert len(positions) == 2 and all(p["blocks"] == 12 for p in positions)
    shutil.rmtree(ckpt / "step_000006")
    shutil.rmtree(ckpt / "final")
    (ckpt / "latest").write_text("step_000003\n")
    run("ddp-halted", **{"train.save_every": 3})
    straight, resumed = (load_file(tmp_path / "ckpt" / r / "final" / "model.safetensors")
                         for r in ("ddp-straight", "ddp-halted"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("extra, needle", [
    ({"data.validation_files": "[]"}, "set data.validation_files"),
    ({"data.source": "wiki_sample"}, "set data.validation_files"),
    ({"data.mask_weighting": "rare"}, "data.mask_weighting=rare needs the training blocks"),
    ({"train.epochs": 1}, "train.epochs needs the training blocks"),
    ({"train.num_workers": 2}, "train.num_workers > 0 needs"),
])
def test_streaming_refuses_what_needs_fixed_blocks(tmp_path, stream_files, extra, needle):
    from kd.config_checks import validate_pretrain
    items = {"run_name": "x", "teacher.name": "t", "data.source": "text", "data.train_files": f"[{stream_files[0]}]",
             "data.validation_files": f"[{stream_files[1]}]", "data.streaming": "true", **extra}
    cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in items.items()])
    with pytest.raises(KDError, match=needle):
        validate_pretrain(cfg)


def test_a_hub_dataset_streams_each_rank_its_own_share(tmp_path, monkeypatch):
    import datasets
    rows = [f"document number {i}" for i in range(40)]
    stream = datasets.Dataset.from_dict({"text": rows, "id": list(range(40))}).to_iterable_dataset(num_shards=4)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, streaming=False: {"train": stream})
    cfg = data_cfg(("unused.txt", "unused.txt"), **{"data.source": "hub"})
    assert [r["text"] for r in document_stream_factory(cfg, 0, 1)()] == rows
    shares = [[r["text"] for r in document_stream_factory(cfg, rank, 2)()] for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(rows) and len(shares[0]) == len(shares[1]) == 20
