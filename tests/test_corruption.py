"""Corrupt and foreign files, at random offsets: a flipped byte, a truncation, another run's file.

For a checkpoint, a teacher-cache manifest or shard, and a config, each damage is caught by a hash
or by the file's structure, with a clear error or a fallback to the previous good checkpoint. The
only damage allowed to pass is damage that changes nothing: a flipped byte in a JSON manifest's
indentation, another run's file that is byte for byte ours (a scheduler in the same state), or in
a config a comment or a setting that a resumed run may change anyway."""
import json
import logging
import os
import random
import shutil

import pytest

from kd.checkpoint import Checkpointer, config_diff
from kd.config import PretrainConfig, load_config, to_dict
from kd.data.blocks import load_blocks
from kd.errors import KDError
from kd.integrity import RESUMABLE_KEYS, run_identity
from kd.models import load_tokenizer
from kd.pretrain import run_pretraining
from kd.teacher_cache.format import SHARDS, teacher_weights_sha256
from kd.teacher_cache.generate import run_cache_generation
from kd.teacher_cache.read import TeacherCache
from tests.conftest import tiny_overrides
from tests.test_faults import save_step, toy_parts
from tests.test_teacher_cache import make_cfg, small_corpus  # noqa: F401 (a fixture)

TRIALS = 12


def flip_byte(path, rng):
    data = bytearray(open(path, "rb").read())
    data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    open(path, "wb").write(bytes(data))


def truncate(path, rng):
    with open(path, "r+b") as fh:
        fh.truncate(rng.randrange(os.path.getsize(path)))


def meaning(path):
    """What a file says: its JSON value (so indentation does not count), else its bytes."""
    data = open(path, "rb").read()
    if str(path).endswith(".json"):
        try:
            return json.loads(data)
        except ValueError:
            return None
    return data


# ---- checkpoints -------------------------------------------------------------------------------
CHECKPOINT_FILES = ("manifest.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "state.json",
                    "rng_rank0.pt")
IDENTITY = {"run_name": "a", "train": {"lr": 0.1, "seed": 0}}


@pytest.fixture
def runs(tmp_path):
    """Two checkpoints of this run (steps 1 and 2), and one checkpoint of another run."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    checkpointer = Checkpointer(str(ours), 2, {"k": 1}, IDENTITY)
    save_step(checkpointer, 1, toy_parts(0))
    save_step(checkpointer, 2, toy_parts(1))
    save_step(Checkpointer(str(theirs), 2, {"k": 1}, {"run_name": "b", "train": {"lr": 0.2, "seed": 0}}),
              2, toy_parts(2))
    return ours, theirs


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_file_of_the_newest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, damage, name,
                                                                                  caplog):
    ours, theirs = runs
    rng = random.Random(f"{damage}-{name}")
    for trial in range(TRIALS if damage != "foreign" else 1):
        run_dir = tmp_path / f"trial{trial}"
        shutil.copytree(ours, run_dir)
        target = run_dir / "step_000002" / name
        before = meaning(target)
        if damage == "flip":
            flip_byte(target, rng)
        elif damage == "truncate":
            truncate(target, rng)
        else:
            shutil.copy(theirs / "step_000002" / name, target)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            found = Checkpointer(str(run_dir), 2, {"k": 1}, IDENTITY).find_resumable("auto")
        if found == str(run_dir / "step_000002"):  # only damage that changes nothing may pass
            assert meaning(target) == before, (damage, trial)
            continue
        assert found == str(run_dir / "step_000001"), (damage, trial)
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert "skipping corrupt checkpoint" in warning and "step_000002" in warning


def test_another_runs_whole_checkpoint_is_refused_by_name(runs, tmp_path):
    ours, theirs = runs
    shutil.rmtree(ours / "step_000002")
    shutil.copytree(theirs / "step_000002", ours / "step_000002")  # consistent in itself: it verifies
    checkpointer = Checkpointer(str(ours), 2, {"k": 1}, IDENTITY)
    folder = checkpointer.find_resumable("auto")
    with pytest.raises(KDError, match=r"belongs to another run \(differs in: run_name: 'b' in the checkpoint, "
                                      r"'a' now; train.lr: 0.2 in the checkpoint, 0.1 now\)"):
        checkpointer.load(folder, *toy_parts(), None)


def test_when_no_checkpoint_verifies_the_run_stops_instead_of_starting_over(runs):
    ours, _ = runs
    for step in ("step_000001", "step_000002"):
        flip_byte(ours / step / "model.safetensors", random.Random(step))
    with pytest.raises(KDError, match=r"none of the 2 checkpoint\(s\) in .* verifies .*checksum mismatch.*"
                                      r"train.resume=none"):
        Checkpointer(str(ours), 2, {"k": 1}, IDENTITY).find_resumable("auto")


# ---- teacher cache -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_teacher_dir, small_corpus, shared_cache):  # noqa: F811
    """Our cache, and another run's (other mask seed): same shard names, other content."""
    root = tmp_path_factory.mktemp("corrupt_caches")
    cfgs = {name: make_cfg(root, tiny_teacher_dir, small_corpus, shared_cache, root / name,
                           **{"teacher_cache.epochs": 1, **extra})
            for name, extra in (("ours", {}), ("theirs", {"data.mask_seed": 7}))}
    for cfg in cfgs.values():
        run_cache_generation(cfg)
    tokenizer = load_tokenizer(tiny_teacher_dir)
    train, val = load_blocks(cfgs["ours"].data, tokenizer, cfgs["ours"].data.split_seed)
    return {"root": root, "cfg": cfgs["ours"], "tokenizer": tokenizer, "splits": {"train": train, "validation": val},
            "teacher_sha": teacher_weights_sha256(tiny_teacher_dir)}


def open_and_check(caches, path):
    """Everything a training run does with a cache before it reads a row."""
    cache = TeacherCache(str(path))
    cache.check_config(caches["cfg"], caches["tokenizer"], caches["teacher_sha"])
    cache.check_blocks(caches["cfg"], caches["splits"])
    cache.verify("once")


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign"])
@pytest.mark.parametrize("target", ["manifest.json", "shard"])
def test_a_damaged_cache_manifest_or_shard_is_refused(caches, tmp_path, damage, target):
    root, rng = caches["root"], random.Random(f"{damage}-{target}")
    shard = os.path.join(SHARDS, sorted(os.listdir(root / "ours" / SHARDS))[0])
    shard = shard if shard.endswith(".npy") else shard[:-len(".json")]
    name = "manifest.json" if target == "manifest.json" else shard
    passed = 0
    for trial in range(TRIALS if damage != "foreign" else 1):
        path = tmp_path / f"trial{trial}"
        shutil.copytree(root / "ours", path)
        open_and_check(caches, path)  # intact: passes, and records its shards as verified
        before = meaning(path / name)
        if damage == "flip":
            flip_byte(path / name, rng)
        elif damage == "truncate":
            truncate(path / name, rng)
        else:
            shutil.copy(root / "theirs" / name, path / name)
        try:
            open_and_check(caches, path)
        except KDError as err:
            assert str(path) in str(err), err
            continue
        assert meaning(path / name) == before, (damage, trial)  # only damage that changes nothing
        passed += 1
    assert passed < TRIALS // 2


# ---- config ------------------------------------------------------------------------------------
CONFIG = """# a tiny distillation run
run_name: tiny
teacher:
  name: {teacher}
student:
  num_layers: 2
data:
  source: text
  train_files: [{corpus}]
  validation_fraction: 0.2
  seq_len: 64
  cache_dir: {cache}
loss:
  alpha_kd: 5.0
  temperature: 2.0
train:
  max_steps: 3
  batch_size: 4
  lr: 1.0e-3
  warmup_steps: 1
  eval_every: 0
  save_every: 3
"""


def identity_of(path):
    return run_identity(to_dict(load_config(PretrainConfig, str(path), [])))


def test_a_damaged_or_foreign_config_never_resumes_a_run_silently(tmp_path, tiny_teacher_dir, corpus_file,
                                                                   shared_cache):
    good = tmp_path / "run.yaml"
    good.write_text(CONFIG.format(teacher=tiny_teacher_dir, corpus=corpus_file, cache=shared_cache))
    original = identity_of(good)
    run_dir = tmp_path / "ckpt"
    folder = save_step(Checkpointer(str(run_dir), 2, {}, original), 3, toy_parts())
    rng, outcomes = random.Random(0), {"error": 0, "refused": 0, "same run": 0}
    candidates = [("flip", i) for i in range(40)] + [("truncate", i) for i in range(20)] + \
        [("foreign", name) for name in ("configs/demo.yaml", "configs/demo_teacher.yaml", "configs/distilbert.yaml")]
    for damage, detail in candidates:
        bad = tmp_path / "bad.yaml"
        shutil.copy(detail if damage == "foreign" else good, bad)
        flip_byte(bad, rng) if damage == "flip" else truncate(bad, rng) if damage == "truncate" else None
        try:
            identity = identity_of(bad)
        except KDError:
            outcomes["error"] += 1  # unparsable, an unknown key, a wrong type: a one-line error
            continue
        if identity == original:  # a comment, spacing, or a setting a resumed run may change
            changed = config_diff(to_dict(load_config(PretrainConfig, str(good), [])),
                                  to_dict(load_config(PretrainConfig, str(bad), [])))
            assert all(any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS) for key, _, _ in changed)
            outcomes["same run"] += 1
            continue
        with pytest.raises(KDError, match="belongs to another run"):
            Checkpointer(str(run_dir), 2, {}, identity).load(folder, *toy_parts(), None)
        outcomes["refused"] += 1
    assert outcomes["error"] > 0 and outcomes["refused"] > 0, outcomes


def test_resuming_with_a_changed_setting_is_refused_by_a_real_run(tmp_path, tiny_teacher_dir, corpus_file,
                                                                   shared_cache):
    """pretrain.py gives its checkpoints the run's identity (the test above checks the mechanism)."""
    def run(*extra):
        overrides = tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, run_name="cfg", steps=3,
                                   **{"train.eval_every": 0})
        return run_pretraining(load_config(PretrainConfig, None, overrides + list(extra)))
    run()
    with pytest.raises(KDError, match=r"belongs to another run \(differs in: train.lr: 0.001 in the checkpoint, "
                                      r"0.002 now\)"):
        run("train.lr=0.002", "train.max_steps=6", "train.log_every=2")  # the last two may change
    # naming the checkpoint is the user vouching for it: the run continues with the new learning rate
    named = tmp_path / "ckpt" / "cfg" / "step_000003"
    run("train.lr=0.002", "train.max_steps=6", f"train.resume={named}")
    records = [json.loads(line) for line in (tmp_path / "logs" / "cfg" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r][-3:] == [4, 5, 6]
