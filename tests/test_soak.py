"""The reliability soak in CI: five faults, one of each kind, on 2-process pretraining under torchrun
(bench/soak.py; `make soak` is the long one), and the pieces it rests on: the fault-point hold and
a comparison that does see a difference."""
import json
import os
import random
import shutil
import threading
import time

import torch

from bench.soak import plan
from bench.soak_workloads import compare_training
from kd import fault_points
from kd.fault_points import CHECKPOINT_POINTS
from tests.conftest import PY, run_script


def test_short_soak_survives_every_fault_with_bitwise_equal_state(tmp_path):
    result = run_script([PY, "bench/soak.py", "--pretrain-faults", "5", "--cache-faults", "0",
                         "--finetune-faults", "0", "--out", str(tmp_path)], timeout=900)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert out.strip().splitlines()[-1] == "soak: 5 faults, 5 survived, bitwise equal: yes", out
    for kind in ("SIGKILL worker", "SIGTERM worker", "SIGKILL job", "SIGTERM job", "inside checkpoint."):
        assert kind in out, out
    # the comparison behind "bitwise equal" does see one changed optimizer value or data position
    ckpt = tmp_path / "pretraining" / "ckpt"
    step = max(int(n.split("_")[1]) for n in os.listdir(ckpt / "soaked") if n.startswith("step_"))
    assert compare_training(str(ckpt / "reference"), str(ckpt / "soaked"), step) == []
    shutil.copytree(ckpt / "soaked", ckpt / "altered")
    folder = ckpt / "altered" / f"step_{step:06d}"
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    first = next(iter(optimizer["state"].values()))
    first["exp_avg"].view(-1)[0] += 1e-12
    torch.save(optimizer, folder / "optimizer.pt")
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "samples_in_epoch": state["samples_in_epoch"] + 4}))
    differences = compare_training(str(ckpt / "reference"), str(ckpt / "altered"), step)
    assert "optimizer.pt" in differences and any("data position" in d for d in differences), differences


def test_a_short_plan_has_every_kind_and_a_long_one_every_point():
    kinds = {(s.signal, s.target, s.moment in CHECKPOINT_POINTS) for s in plan(5, CHECKPOINT_POINTS, random.Random(0))}
    assert kinds == {("SIGKILL", "worker", True), ("SIGKILL", "worker", False), ("SIGTERM", "worker", False),
                     ("SIGTERM", "job", False), ("SIGKILL", "job", False)}
    long = plan(50, CHECKPOINT_POINTS, random.Random(1))
    assert {s.moment for s in long} >= set(CHECKPOINT_POINTS) | {"random time", "start-up"}


def test_an_armed_point_holds_one_process_until_released(tmp_path, monkeypatch):
    monkeypatch.setenv(fault_points.ENV, str(tmp_path))
    fault_points.reached("checkpoint.renamed")  # not armed: passes at once, and is traced
    (tmp_path / "armed.checkpoint.renamed").touch()
    done = []
    worker = threading.Thread(target=lambda: done.append(fault_points.reached("checkpoint.renamed")))
    worker.start()
    held = tmp_path / fault_points.held_name("checkpoint.renamed", os.getpid())
    deadline = time.monotonic() + 10
    while not held.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held.exists() and not (tmp_path / "armed.checkpoint.renamed").exists()
    time.sleep(0.2)
    assert not done  # still held
    held.unlink()
    worker.join(timeout=10)
    assert done == [None]
    assert (tmp_path / "trace").read_text().count("checkpoint.renamed") == 2
