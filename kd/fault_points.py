"""Test-only fault points: named moments inside the writes that must survive a crash.

The reliability soak (bench/soak.py) holds a process at one of these moments and kills it, or its
peer, right there: a kill *during* a checkpoint save or a teacher-cache shard write rather than
between writes. Unless KD_FAULT_POINTS is set (only the soak sets it), `reached` returns at once.

With KD_FAULT_POINTS=<folder>:
- every call appends "<point> <rank> <pid>" to <folder>/trace, so the soak can count the writes
  that were done again after a fault;
- the soak arms a point by creating <folder>/armed.<point>. The first process to reach it renames
  that file to held.<point>.<pid> (a rename is atomic: exactly one process takes it) and waits
  until the file is gone, at most HOLD_SECONDS: the soak kills it or its peer, then removes it.
"""
import os
import time

ENV = "KD_FAULT_POINTS"
HOLD_SECONDS = 120.0  # never hold a run forever if the soak itself died

# Every point, in the order a save passes them (the soak picks from these lists).
CHECKPOINT_POINTS = ("checkpoint.rank_state_written", "checkpoint.model_written", "checkpoint.files_written",
                     "checkpoint.manifest_written", "checkpoint.renamed", "checkpoint.latest_written")
CACHE_POINTS = ("teacher_cache.shard_tmp_written", "teacher_cache.shard_renamed",
                "teacher_cache.shard_recorded", "teacher_cache.manifest_pending")


def held_name(point: str, pid) -> str:
    return f"held.{point}.{pid}"


def reached(point: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    with open(os.path.join(folder, "trace"), "a") as fh:  # one short write: lines never interleave
        fh.write(f"{point} {os.environ.get('RANK', '0')} {os.getpid()}\n")
    held = os.path.join(folder, held_name(point, os.getpid()))
    try:
        os.rename(os.path.join(folder, f"armed.{point}"), held)
    except FileNotFoundError:
        return  # not armed, or another process took it
    deadline = time.monotonic() + HOLD_SECONDS
    while os.path.exists(held) and time.monotonic() < deadline:
        time.sleep(0.01)
