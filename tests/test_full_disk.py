"""A full disk, through the real command line: a file size limit (RLIMIT_FSIZE) that the token
blocks, logs and tokenizer fit under but a student checkpoint (~8 MB of weights) or a ~3 MB cache
shard does not. Each write stops the run with one line naming the file and the space it needed,
keeps the last good checkpoint loadable, and leaves nothing half-written that a rerun would take as
finished; the rerun, given space again, finishes. (Python ignores SIGXFSZ, so the write fails with
EFBIG, as a write to a full disk fails with ENOSPC.)"""
import json
import os
import resource
import subprocess

from kd import checkpoint as ckpt_mod
from kd.teacher_cache.format import SHARDS
from kd.teacher_cache.read import TeacherCache
from tests.conftest import PY, ROOT, run_script, tiny_overrides

LIMIT_BYTES = 2_000_000


def run_limited(args, timeout=300):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                          preexec_fn=limit)


def one_error_line(result) -> str:
    assert result.returncode == 2, f"status {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_checkpoint_save_on_a_full_disk(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    def args(steps):
        return [PY, "ddp_main.py", *tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache,
                                                   run_name="full", steps=steps,
                                                   **{"train.save_every": 3, "train.eval_every": 0})]
    first = run_script(args(3), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "ckpt" / "full"
    result = run_limited(args(6))
    error = one_error_line(result)
    assert "could not save checkpoint" in error and str(run_dir / ".tmp-step_000006" / "model.safetensors") in error
    assert "File too large" in error and " MB needed, " in error and " free on that filesystem" in error
    assert f"previous checkpoint ({run_dir / 'step_000003'}) is intact" in error
    assert (run_dir / "latest").read_text().strip() == "step_000003"
    ckpt_mod.verify(str(run_dir / "step_000003"))
    assert sorted(os.listdir(run_dir)) == ["final", "latest", "step_000003"]  # no half-written save
    again = run_script(args(6), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from " + str(run_dir / "step_000003") in again.stdout
    assert (run_dir / "latest").read_text().strip() == "step_000006"


def test_teacher_cache_shard_write_on_a_full_disk(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    path = tmp_path / "tcache"
    args = [PY, "cache_teacher.py", *tiny_overrides(tmp_path, tiny_teacher_dir, corpus_file, shared_cache, **{
        "teacher_cache.path": path, "teacher_cache.topk": 64, "teacher_cache.shard_blocks": 4096,
        "teacher_cache.batch_size": 64})]
    result = run_limited(args)
    error = one_error_line(result)
    shard = path / SHARDS / "train-e0-00000.npy"
    assert f"could not write shard {shard}" in error and "File too large" in error
    assert " MB needed, " in error and "finished shards are kept" in error
    assert os.listdir(path / SHARDS) == []  # neither the shard nor its temp file nor a record
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] is False
    again = run_script(args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    cache = TeacherCache(str(path))
    assert cache.verify("always")["hashed"] == len(cache.manifest["shards"]) == 2
