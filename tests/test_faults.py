"""Faults end to end: checkpoint integrity, bad input through the real command line (short message,
status 2, no traceback), and safe checkpoint formats. Killed DDP workers under torchrun: test_soak.py."""
import json
import os

import pytest
import torch

from kd import checkpoint as ckpt_mod
from kd.checkpoint import Checkpointer
from kd.config import PretrainConfig, load_config
from kd.errors import KDError
from kd.pretrain import run_pretraining
from tests.conftest import PY, run_script, tiny_overrides


def small_run(tmp_path, teacher, corpus, cache, **kw):
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, teacher, corpus, cache, **kw))
    return run_pretraining(cfg)


# ---- 1. elastic restart: tests/test_soak.py (SIGKILLs and SIGTERMs under torchrun, bitwise) -----
# ---- 2. checkpoint integrity ------------------------------------------------------------------
def toy_parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def save_step(checkpointer, step, parts):
    model, optimizer, scheduler = parts
    return checkpointer.save(model, optimizer, scheduler, None,
                             {"step": step, "epoch": 0, "samples_in_epoch": 0, "tokens_seen": 0})


def test_manifest_lists_every_file_with_its_checksum(tmp_path):
    import hashlib
    run_dir = tmp_path / "run"
    folder = save_step(Checkpointer(str(run_dir), 2, {"k": 1}), 3, toy_parts())
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())["files"]
    on_disk = sorted(n for n in os.listdir(folder) if n != "manifest.json")
    assert sorted(manifest) == on_disk
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "state.json", "rng_rank0.pt"} <= set(on_disk)
    for name, meta in manifest.items():
        data = open(os.path.join(folder, name), "rb").read()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (run_dir / "latest").read_text().strip() == "step_000003"
    # a flipped byte (same size) is caught by the checksum, not just by the size
    target = os.path.join(folder, "optimizer.pt")
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
    with pytest.raises(KDError, match="optimizer.pt: checksum mismatch"):
        ckpt_mod.verify(folder)


def test_latest_moves_only_after_verification(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    checkpointer = Checkpointer(str(run_dir), 1, {})
    parts = toy_parts()
    save_step(checkpointer, 1, parts)

    def failing_verify(folder):
        raise KDError(f"{folder}/model.safetensors: checksum mismatch (corrupt)")

    monkeypatch.setattr(ckpt_mod, "verify", failing_verify)
    with pytest.raises(KDError, match="could not save checkpoint .*step_000002.*checksum mismatch.*intact"):
        save_step(checkpointer, 2, parts)
    monkeypatch.undo()
    assert (run_dir / "latest").read_text().strip() == "step_000001"
    assert not (run_dir / "step_000002").exists()  # the unverified one is not left as a resume candidate
    ckpt_mod.verify(str(run_dir / "step_000001"))  # keep_last=1, yet the verified one was not pruned


def test_pruning_keeps_the_newest_verified_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # a newer-numbered leftover that does not verify (a crashed save, or another run's debris)
    (run_dir / "step_000009").mkdir(parents=True)
    (run_dir / "step_000009" / "manifest.json").write_text("{not json")
    (run_dir / ".tmp-step_000005").mkdir()  # a half-written save: never a candidate
    checkpointer = Checkpointer(str(run_dir), 1, {})
    parts = toy_parts()
    for step in (1, 2, 3):
        save_step(checkpointer, step, parts)
    assert (run_dir / "latest").read_text().strip() == "step_000003"
    ckpt_mod.verify(str(run_dir / "step_000003"))
    assert not (run_dir / "step_000001").exists() and not (run_dir / "step_000002").exists()
    assert checkpointer.find_resumable("auto") == str(run_dir / "step_000003")


def test_checkpoint_from_another_config_is_refused_naming_the_keys(tmp_path):
    run_dir = str(tmp_path / "run")
    saved = {"student": {"num_layers": 2, "hidden_size": None}, "teacher": "t", "seq_len": 64}
    folder = save_step(Checkpointer(run_dir, 2, saved), 1, toy_parts())
    now = {"student": {"num_layers": 3, "hidden_size": None}, "teacher": "t", "seq_len": 128}
    with pytest.raises(KDError) as err:
        Checkpointer(run_dir, 2, now).load(folder, *toy_parts(), None)
    message = str(err.value)
    assert "student.num_layers: 2 in the checkpoint, 3 now" in message
    assert "seq_len: 64 in the checkpoint, 128 now" in message
    assert "hidden_size" not in message and "teacher" not in message
    assert "train.resume=none" in message


def test_previous_checkpoint_survives_until_the_new_one_verifies(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    checkpointer = Checkpointer(str(run_dir), 1, {})  # keep_last=1: the old one goes, but only afterwards
    parts = toy_parts()
    save_step(checkpointer, 1, parts)
    seen = []
    real_verify = ckpt_mod.verify

    def spy(folder):
        seen.append(((run_dir / "latest").read_text().strip(), sorted(os.listdir(run_dir))))
        return real_verify(folder)

    monkeypatch.setattr(ckpt_mod, "verify", spy)
    save_step(checkpointer, 2, parts)
    latest_then, listing_then = seen[-1]
    assert latest_then == "step_000001"                          # `latest` not yet moved
    assert {"step_000001", "step_000002"} <= set(listing_then)   # the previous one not yet pruned
    assert (run_dir / "latest").read_text().strip() == "step_000002"
    assert checkpointer.step_dirs() == ["step_000002"]


# ---- 4. security ----------------------------------------------------------------------------
def test_checkpoints_hold_no_pickles_and_remote_code_is_off(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    import inspect
    from safetensors import safe_open
    from kd.config import TeacherConfig
    from kd.models import load_mlm_model
    small_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="safe", steps=2,
              **{"train.save_every": 0, "train.eval_every": 0})
    folder = tmp_path / "ckpt" / "safe" / "step_000002"
    names = os.listdir(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        assert len(list(fh.keys())) > 0
    pickles = [n for n in names if n.endswith(".pt")]
    assert sorted(pickles) == ["optimizer.pt", "rng_rank0.pt", "scheduler.pt"]
    for name in pickles:
        torch.load(folder / name, weights_only=True)
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pickle"))]
    final = tmp_path / "ckpt" / "safe" / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    assert TeacherConfig().trust_remote_code is False
    assert inspect.signature(load_mlm_model).parameters["trust_remote_code"].default is False
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache))
    assert cfg.teacher.trust_remote_code is False


def test_resume_reads_state_with_weights_only(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path / "run"), 2, {})
    folder = save_step(checkpointer, 1, toy_parts())
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    checkpointer.load(folder, *toy_parts(), None)
    assert calls == [True, True, True]  # optimizer, scheduler, RNG: nothing is unpickled


def test_trust_remote_code_reaches_from_pretrained_only_when_opted_in(tiny_teacher_dir, monkeypatch):
    import transformers
    from kd import models
    from kd.config import TeacherConfig
    seen = []
    for cls in (transformers.BertForMaskedLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", False)))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    models.load_tokenizer(tiny_teacher_dir)
    models.load_teacher(TeacherConfig(name=tiny_teacher_dir), torch.device("cpu"))
    assert seen == [("AutoTokenizer", False), ("BertForMaskedLM", False)]
    seen.clear()
    models.load_teacher(TeacherConfig(name=tiny_teacher_dir, trust_remote_code=True), torch.device("cpu"))
    assert seen == [("BertForMaskedLM", True)]


# ---- 3. bad input through the real command line ---------------------------------------------
def assert_clean_error(result, *needles):
    """Status 2, a short message naming the problem, and no traceback wall."""
    err = result.stderr
    assert result.returncode == 2, f"status {result.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(err.splitlines()) < 25, err
    message = [l for l in err.splitlines() if l.startswith("error: ")]
    assert message, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


def pretrain_cli(tmp_path, teacher, corpus, cache, **extra):
    items = {"train.save_every": 0, "train.eval_every": 0}
    items.update(extra)
    return run_script([PY, "ddp_main.py", *tiny_overrides(tmp_path, teacher, corpus, cache, steps=2, **items)],
                      timeout=120)


def finetune_cli(tmp_path, model, train_file, task="sst2", **extra):
    items = {"run_name": "ft", "model": model, "task": task, "log_dir": str(tmp_path / "logs"),
             "checkpoint_dir": str(tmp_path / "ckpt"), "data.source": "files", "data.train": train_file,
             "data.validation": train_file, "train.max_steps": 2, "train.batch_size": 2}
    items.update(extra)
    return run_script([PY, "finetuneit.py", *[f"{k}={v}" for k, v in items.items()]], timeout=120)


def test_cli_unknown_key_suggests_the_closest(tmp_path):
    result = run_script([PY, "ddp_main.py", "--config", "configs/demo.yaml", "train.max_step=8"], timeout=60)
    assert_clean_error(result, "unknown config key 'train.max_step'", "Did you mean: train.max_steps")


def test_cli_wrong_type_names_the_key(tmp_path):
    result = run_script([PY, "ddp_main.py", "--config", "configs/demo.yaml", "train.batch_size=many"],
                        timeout=60)
    assert_clean_error(result, "train.batch_size", "many")


def test_cli_kd_loss_scale_needs_mlm(tmp_path):
    result = run_script([PY, "ddp_main.py", "--config", "configs/demo.yaml", "loss.kd_loss_scale=1.0",
                         "loss.alpha_mlm=0"], timeout=60)
    assert_clean_error(result, "loss.kd_loss_scale", "loss.alpha_mlm > 0")


def test_cli_seq_len_over_max_positions(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    result = pretrain_cli(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, **{"data.seq_len": 256})
    assert_clean_error(result, "data.seq_len=256", "max_position_embeddings (128)", "lower data.seq_len")


def test_cli_student_deeper_than_teacher(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    result = pretrain_cli(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, **{"student.num_layers": 6})
    assert_clean_error(result, "student.num_layers=6", "deeper than the teacher (4 layers)", "student.init=random")


def test_cli_missing_corpus_file(tmp_path, tiny_teacher_dir, shared_cache):
    missing = str(tmp_path / "nowhere.txt")
    result = pretrain_cli(tmp_path, tiny_teacher_dir, missing, shared_cache)
    assert_clean_error(result, "corpus file not found", missing, "data.train_files")


def test_cli_empty_corpus(tmp_path, tiny_teacher_dir, shared_cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    result = pretrain_cli(tmp_path, tiny_teacher_dir, str(empty), shared_cache)
    assert_clean_error(result, "empty", str(empty))


def _corpus_with_bad_bytes(tmp_path, corpus_file):
    text = open(corpus_file, encoding="utf-8").read().split("\n")
    path = tmp_path / "bad.txt"
    with open(path, "wb") as fh:
        fh.write("\n".join(text[:3]).encode() + b"\nzzqx \xff\xfe bytes here\n" +
                 "\n".join(text[3:]).encode())
    return path


def test_cli_undecodable_bytes_error_names_file_and_line(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    path = _corpus_with_bad_bytes(tmp_path, corpus_file)
    result = pretrain_cli(tmp_path, tiny_teacher_dir, str(path), shared_cache, **{"data.on_bad_bytes": "error"})
    assert_clean_error(result, f"{path}:4: undecodable bytes", "data.on_bad_bytes=skip")


def test_undecodable_bytes_skip_mode_skips_and_counts(tmp_path, tiny_teacher_dir, corpus_file, caplog):
    import logging

    import numpy as np
    from kd.data.blocks import load_blocks
    from kd.models import load_tokenizer
    path = _corpus_with_bad_bytes(tmp_path, corpus_file)
    tok = load_tokenizer(tiny_teacher_dir)

    def blocks(corpus):
        cfg = load_config(PretrainConfig, None, ["run_name=x", "data.source=text", f"data.train_files=[{corpus}]",
                                                 "data.seq_len=64", "data.validation_fraction=0.2",
                                                 f"data.cache_dir={tmp_path / 'cache'}"])
        return load_blocks(cfg.data, tok, 0)
    with caplog.at_level(logging.WARNING):
        skipped = blocks(path)
    assert all(np.array_equal(a, b) for a, b in zip(skipped, blocks(corpus_file)))  # the bad line alone is gone
    assert any(f"{path}: skipped 1 line(s) with undecodable bytes" in r.getMessage() for r in caplog.records)


@pytest.fixture
def rows_file(tmp_path):
    def write(header, rows, name="rows.tsv"):
        path = tmp_path / name
        path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
        return str(path)
    return write


def test_cli_finetune_missing_column(tmp_path, tiny_teacher_dir, rows_file):
    path = rows_file(["text", "label"], [["a fine film", "1"], ["a dull film", "0"]])
    result = finetune_cli(tmp_path, tiny_teacher_dir, path)
    assert_clean_error(result, path, "missing column(s) ['sentence']", "data.text_columns")


def test_cli_finetune_label_outside_the_label_set(tmp_path, tiny_teacher_dir, rows_file):
    path = rows_file(["sentence", "label"], [["a fine film", "1"], ["a dull film", "7"]])
    result = finetune_cli(tmp_path, tiny_teacher_dir, path)
    assert_clean_error(result, f"{path}:3", "'7'", "label set")


def test_cli_squad_answer_that_does_not_match_its_start(tmp_path, tiny_teacher_dir):
    context = "Normandy is a region in France. The Normans gave their name to it."
    doc = {"version": "1.1", "data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "Who gave their name?", "answers": [{"text": "The Normans", "answer_start": 30}]},
    ]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc))
    result = finetune_cli(tmp_path, tiny_teacher_dir, str(path), task="squad")
    assert_clean_error(result, "q1", "'The Normans'", "on_bad_row=skip")


def test_cli_teacher_and_tokenizer_vocabularies_differ(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    from transformers import BertTokenizer
    vocab = tmp_path / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "of", "and", "in", "to", "is"]
    vocab.write_text("\n".join(words) + "\n")
    folder = tmp_path / "small_tok"
    BertTokenizer(str(vocab)).save_pretrained(folder)
    result = pretrain_cli(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, **{"data.tokenizer": folder})
    assert_clean_error(result, "vocabulary (30522)", f"tokenizer's ({len(words)})", "unset data.tokenizer")


def test_cli_teacher_without_mlm_head(tmp_path, corpus_file, shared_cache):
    result = pretrain_cli(tmp_path, "packaged-minilm", corpus_file, shared_cache)
    assert_clean_error(result, "has no trained MLM head", "configs/demo_teacher.yaml")


def test_cli_checkpoint_from_another_config(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    small_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="cfgdiff", steps=2)
    result = pretrain_cli(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="cfgdiff",
                          **{"student.num_layers": 3})
    assert_clean_error(result, "comes from another config", "student.num_layers", "train.resume=none")


def test_blocks_built_with_skip_are_not_reused_by_a_later_error_run(tmp_path, tiny_teacher_dir, corpus_file):
    """data.on_bad_bytes is in the block cache key: a corpus cached with `skip` must still fail under `error`."""
    from kd.config import PretrainConfig, load_config
    from kd.data.blocks import load_blocks
    from kd.errors import KDError
    from kd.models import load_tokenizer
    path = _corpus_with_bad_bytes(tmp_path, corpus_file)
    tok = load_tokenizer(tiny_teacher_dir)

    def cfg(mode):
        return load_config(PretrainConfig, None, ["run_name=x", "data.source=text", f"data.train_files=[{path}]",
                                                  "data.seq_len=64", "data.validation_fraction=0.2",
                                                  f"data.cache_dir={tmp_path / 'cache'}", f"data.on_bad_bytes={mode}"])
    train, _ = load_blocks(cfg("skip").data, tok, 0)
    assert len(train) > 0
    with pytest.raises(KDError, match="undecodable bytes"):
        load_blocks(cfg("error").data, tok, 0)
