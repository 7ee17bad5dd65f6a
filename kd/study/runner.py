"""Running the study's stages: skip what finished unchanged, resume what was interrupted, record minutes.

A stage counts as done when its output exists (a pretraining run's export, a fine-tune's results.json,
a complete cache manifest) *and* the config it ran with, read back through today's schema, equals the
config it would run with now. Stage output goes to logs/<name>/<run>.out; the driver prints one line
per stage, which is what a `nohup` log should hold. logs/<name>/stages.json records each stage's
command, process count and minutes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from kd.config import load_config, to_dict, to_yaml
from kd.errors import KDError
from kd.logger import write_json
from kd.study.plan import Stage, log_dir
from kd.study.spec import ExperimentConfig

REPO = Path(__file__).resolve().parents[2]  # where ddp_main.py and finetuneit.py live


def saved_config(stage: Stage) -> dict:
    """The config a finished stage ran with, read through today's schema: a key added to the schema
    since then counts with its default, so new options do not invalidate finished runs."""
    saved_yaml = stage.log_dir / "config.yaml"
    if not saved_yaml.is_file():
        raise KDError(f"stage {stage.run} has its output {stage.output} but no {saved_yaml}, so its settings "
                      f"cannot be checked; delete {stage.log_dir} and {stage.checkpoint_dir} to run it again")
    return to_dict(load_config(stage.schema(), str(saved_yaml), []))


class StageRecord:
    """logs/<name>/stages.json: the command and minutes of each stage, kept across reruns."""

    def __init__(self, path: Path):
        self.path = path
        self.stages = json.loads(path.read_text()) if path.is_file() else {}

    def check_unchanged(self, stage: Stage) -> None:
        """A finished stage is kept only if it ran with the config it would run with now (the
        resolved config, so an edited preset counts as well as an edited override) and as many
        processes (they set the global batch)."""
        from kd.checkpoint import config_diff

        diff = config_diff(saved_config(stage), to_dict(stage.resolve()))
        was = self.stages.get(stage.run, {}).get("nproc")
        if was is not None and was != stage.nproc:
            diff.append(("nproc", was, stage.nproc))
        if diff:
            changes = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diff)
            raise KDError(f"stage {stage.run} already finished with other settings ({changes}). Restore them, or "
                          f"delete {stage.log_dir} and {stage.checkpoint_dir} to run it again (and the stages "
                          f"that use it).")

    def add_minutes(self, stage: Stage, minutes: float, finished: bool) -> None:
        entry = self.stages.setdefault(stage.run, {"kind": stage.kind, "minutes": 0.0})
        entry["minutes"] = round(entry["minutes"] + minutes, 2)
        if finished:
            entry.update(argv=stage.argv, nproc=stage.nproc)
        write_json(str(self.path), self.stages)


def threads_per_process(nproc: int) -> int:
    """Every core busy: 2 processes on 2 cores get a thread each, 1 process gets both."""
    return max(1, (os.cpu_count() or 1) // nproc)


def torchrun_command(stage: Stage) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={stage.nproc}",
            str(REPO / stage.script), *stage.argv[1:]]


def run_subprocess(stage: Stage, out_path: Path) -> int:
    """Run a stage under torchrun, appending its output to out_path. SIGTERM/SIGINT are passed on,
    so a pretraining run saves a checkpoint before the driver exits."""
    command = torchrun_command(stage)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(stage.nproc))}
    with open(out_path, "a") as out:
        out.write(f"\n$ OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {' '.join(command)}\n")
        out.flush()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        forwarded = []

        def forward(signum, _frame):
            forwarded.append(signum)
            child.send_signal(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = child.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    if forwarded:
        raise SystemExit(128 + forwarded[0])
    return code


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def run_stages(cfg: ExperimentConfig, stages: List[Stage],
               runner: Callable[[Stage, Path], int] = run_subprocess, say=print) -> Dict[str, float]:
    """Run what is not done yet; returns minutes per stage as recorded in stages.json."""
    out_dir = log_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = StageRecord(out_dir / "stages.json")
    for i, stage in enumerate(stages, 1):
        prefix = f"[{i}/{len(stages)}] {stage.run} ({stage.kind}{', lever' if stage.lever else ''})"
        if stage.done():
            record.check_unchanged(stage)
            say(f"{prefix}: done before, skipped")
            continue
        out_path = out_dir / f"{stage.run}.out"
        say(f"{prefix}: running, output in {out_path}")
        started = time.time()
        try:
            code = runner(stage, out_path)
        except BaseException:  # stopped (SIGTERM/SIGINT): the minutes spent still count when it resumes
            record.add_minutes(stage, (time.time() - started) / 60, finished=False)
            raise
        minutes = (time.time() - started) / 60
        finished = code == 0 and stage.done()
        if finished and stage.kind == "cache":  # cache_teacher.py keeps no config.yaml of its own
            stage.log_dir.mkdir(parents=True, exist_ok=True)
            (stage.log_dir / "config.yaml").write_text(to_yaml(stage.resolve()))
        record.add_minutes(stage, minutes, finished)
        if not finished:
            why = f"exit code {code}" if code else f"it exited without writing {stage.output}"
            raise KDError(f"stage {stage.run} failed ({why}) after {minutes:.1f} min. Last lines of "
                          f"{out_path}:\n{tail(out_path)}\nFix the cause and rerun: finished stages are skipped "
                          f"and an interrupted pretraining run resumes from its last checkpoint.")
        say(f"{prefix}: finished in {minutes:.1f} min")
    return {run: entry["minutes"] for run, entry in record.stages.items()}


def recorded_minutes(cfg: ExperimentConfig) -> Dict[str, float]:
    """Minutes per stage from stages.json, without running anything (experiment.py --report-only)."""
    return {run: e["minutes"] for run, e in StageRecord(log_dir(cfg) / "stages.json").stages.items()}
