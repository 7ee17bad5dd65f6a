"""Interruptions and faults: signals, non-finite steps, corrupt checkpoints, a full disk."""
import errno
import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch
from torch import nn

from kd import checkpoint as ckpt_mod
from kd.checkpoint import Checkpointer
from kd.config import PretrainConfig, TrainConfig, load_config
from kd.dist import DistInfo
from kd.data.loader import make_loader
from kd.engine import Trainer
from kd.errors import KDError
from kd.pretrain import run_pretraining
from tests.conftest import PY, ROOT, tiny_overrides


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"input_ids": torch.full((4,), float(i % 7))}


def toy_trainer(tmp_path, loss_fn, **train_kw):
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=0.1, warmup_steps=0, eval_every=0, save_every=0,
                      log_every=1, **train_kw)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    loader = make_loader(Rows(), cfg.batch_size, None)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    return Trainer(cfg, info, model, loss_fn, loader, Checkpointer(str(tmp_path / "ck"), 2, {}),
                   str(tmp_path / "logs"))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(batch["input_ids"]).pow(2).mean()
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), {}

    trainer = toy_trainer(tmp_path, loss_fn)
    trainer.fit()
    assert trainer.state.step == 10 and trainer.state.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    records = [json.loads(l) for l in open(tmp_path / "logs" / "metrics.jsonl")]
    assert max(r.get("skipped_steps", 0) for r in records) == 2


def test_too_many_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    def loss_fn(model, batch):
        return model(batch["input_ids"]).pow(2).mean() * float("inf"), {}

    trainer = toy_trainer(tmp_path, loss_fn, max_nonfinite_skips=3)
    with pytest.raises(KDError, match="3 consecutive steps had a non-finite"):
        trainer.fit()
    assert trainer.state.step == 0


def small_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, **kw):
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file,
                                                           shared_cache, **kw))
    return run_pretraining(cfg)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, tiny_teacher_dir, corpus_file,
                                                             shared_cache, caplog):
    small_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="fb", steps=6)
    run_dir = tmp_path / "ckpt" / "fb"
    newest = run_dir / "step_000006" / "model.safetensors"
    with open(newest, "r+b") as fh:
        fh.truncate(os.path.getsize(newest) // 2)
    with caplog.at_level(logging.WARNING):
        found = Checkpointer(str(run_dir), 2, {}).find_resumable("auto")
    assert found == str(run_dir / "step_000003")
    assert any("step_000006/model.safetensors" in r.getMessage() and "truncated" in r.getMessage()
               for r in caplog.records)


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, tiny_teacher_dir, corpus_file,
                                                                   shared_cache, monkeypatch):
    small_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="full", steps=3,
              **{"train.save_every": 0})
    run_dir = tmp_path / "ckpt" / "full"
    before = (run_dir / "latest").read_text()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_model", no_space)
    with pytest.raises(KDError, match=r"model.safetensors failed \(No space left on device\); about .* MB needed, "
                                      r".* free on that filesystem. The previous checkpoint .* is intact"):
        small_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="full", steps=6,
                  **{"train.save_every": 0})
    assert (run_dir / "latest").read_text() == before
    ckpt_mod.verify(str(run_dir / before.strip()))  # still loads
    assert not any(n.startswith(".tmp") for n in os.listdir(run_dir))


def test_sigterm_finishes_the_step_saves_and_resumes(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    args = [PY, "ddp_main.py", *tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache,
                                               run_name="sig", steps=400, **{"train.save_every": 0,
                                                                             "train.eval_every": 0})]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "logs" / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("train/loss") < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "stopped by SIGTERM" in out
    latest = (tmp_path / "ckpt" / "sig" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < 400
    small_run(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="sig", steps=stopped_at + 2,
              **{"train.save_every": 0, "train.eval_every": 0})
    records = [json.loads(l) for l in open(metrics)]
    resumed_steps = [r["step"] for r in records if "train/loss" in r][-2:]
    assert resumed_steps == [stopped_at + 1, stopped_at + 2]
