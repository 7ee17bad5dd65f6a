"""The offline study as a resumable pipeline of ordinary runs (configs/experiment.yaml).

Each stage is one `torchrun ddp_main.py` or `torchrun finetuneit.py` command. A stage counts as
done when its output exists (a pretraining run's export, a fine-tune's results.json) *and* the run's
saved config.yaml equals the config it would run with now; logs/<name>/stages.json records each
stage's command, process count and minutes. So a rerun
after an interruption skips what finished, and an interrupted pretraining run resumes from its own
last checkpoint. Stage output goes to logs/<name>/<run>.out; this driver prints one line per stage,
which is what a `nohup` log should hold.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from omegaconf import OmegaConf

from kd.config import load_config, to_dict
from kd.errors import KDError
from kd.logger import write_json


@dataclass
class RunSpec:
    config: str = "???"
    teacher: Optional[str] = None       # an earlier pretraining run of the study; its export teaches
    init_from: Optional[str] = None     # an earlier run whose export is the starting weights
    overrides: List[str] = field(default_factory=list)


@dataclass
class FinetuneSpec:
    config: str = "configs/finetune_tweets.yaml"
    models: List[str] = field(default_factory=list)     # pretraining runs of the study
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: List[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    nproc: int = 2
    log_dir: str = "logs"               # runs go to <log_dir>/<name>/<run>, and so on
    checkpoint_dir: str = "checkpoints"
    plots_dir: str = "plots"
    pretrain_overrides: List[str] = field(default_factory=list)
    pretrain: Dict[str, RunSpec] = field(default_factory=dict)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    levers: Dict[str, RunSpec] = field(default_factory=dict)
    run_levers: bool = False            # also run the `levers` pretraining runs


@dataclass
class Stage:
    run: str
    kind: str                           # pretrain | finetune | lever
    argv: List[str]                     # script, --config PRESET, overrides (torchrun is added when run)
    output: Path                        # exists once the stage has finished
    log_dir: Path                       # where the run writes config.yaml, metrics.jsonl, ...
    checkpoint_dir: Path                # its checkpoints and export

    @property
    def script(self) -> str:
        return self.argv[0]

    def resolve(self):
        """The config the run will resolve to, as the script itself resolves it."""
        if self.script == "finetuneit.py":
            from kd.finetune import FinetuneConfig as schema
        else:
            from kd.config import PretrainConfig as schema
        return load_config(schema, self.argv[2], self.argv[3:])


def load_experiment(path: str, overrides: List[str]) -> ExperimentConfig:
    cfg = load_config(ExperimentConfig, path, overrides)
    if cfg.nproc < 1:
        raise KDError(f"nproc={cfg.nproc} must be >= 1")
    if not cfg.pretrain:
        raise KDError(f"{path} lists no pretraining runs under `pretrain:`")
    return cfg


REPO = Path(__file__).resolve().parent.parent  # where ddp_main.py and finetuneit.py live


def export_dir(cfg, run: str) -> Path:
    return Path(cfg.checkpoint_dir) / cfg.name / run / "final"


def log_dir(cfg) -> Path:
    return Path(cfg.log_dir) / cfg.name


def plots_dir(cfg) -> Path:
    return Path(cfg.plots_dir) / cfg.name


def plan(cfg: ExperimentConfig) -> List[Stage]:
    """Every stage in order: pretraining runs, fine-tunes (model x seed), then levers if asked."""
    stages, known = [], []
    dirs = [f"log_dir={log_dir(cfg)}", f"checkpoint_dir={Path(cfg.checkpoint_dir) / cfg.name}"]

    def earlier_export(run, role, name):
        if name not in known:
            raise KDError(f"run {run!r} names {role} {name!r}, which is not an earlier run of the study "
                          f"(earlier runs: {', '.join(known) or 'none'})")
        return export_dir(cfg, name)

    def pretrain_stage(run, spec, kind):
        wiring = []
        if spec.teacher:
            wiring.append(f"teacher.name={earlier_export(run, 'teacher', spec.teacher)}")
        if spec.init_from:
            wiring.append(f"student.init=pretrained:{earlier_export(run, 'init_from', spec.init_from)}")
        argv = ["ddp_main.py", "--config", spec.config, f"run_name={run}", *dirs, *wiring,
                *cfg.pretrain_overrides, *spec.overrides]
        known.append(run)
        return Stage(run, kind, argv, export_dir(cfg, run) / "config.json", log_dir(cfg) / run,
                     export_dir(cfg, run).parent)

    for run, spec in cfg.pretrain.items():
        stages.append(pretrain_stage(run, spec, "pretrain"))
    ft = cfg.finetune
    for model in ft.models:
        if model not in cfg.pretrain:
            raise KDError(f"finetune.models names {model!r}, which is not a pretraining run of the study "
                          f"({', '.join(cfg.pretrain)})")
        for seed in ft.seeds:
            run = finetune_run(model, seed)
            argv = ["finetuneit.py", "--config", ft.config, f"run_name={run}", *dirs,
                    f"model={export_dir(cfg, model)}", f"train.seed={seed}", *ft.overrides]
            stages.append(Stage(run, "finetune", argv, log_dir(cfg) / run / "results.json", log_dir(cfg) / run,
                                export_dir(cfg, run).parent))
    if cfg.run_levers:
        for run, spec in cfg.levers.items():
            if run in cfg.pretrain:
                raise KDError(f"lever {run!r} has the name of a main run; give it its own name")
            stages.append(pretrain_stage(run, spec, "lever"))
    return stages


def finetune_run(model: str, seed: int) -> str:
    return f"{model}-tweets-s{seed}"


# ------------------------------------------------------------------------------------- running

class StageRecord:
    """logs/<name>/stages.json: the command and minutes of each stage, kept across reruns."""

    def __init__(self, path: Path):
        self.path = path
        self.stages = json.loads(path.read_text()) if path.is_file() else {}

    def check_unchanged(self, stage: Stage, nproc: int) -> None:
        """A finished stage is kept only if it ran with the config it would run with now (the
        resolved config, so an edited preset counts as well as an edited override) and as many
        processes (they set the global batch)."""
        from kd.checkpoint import config_diff

        saved_yaml = stage.log_dir / "config.yaml"
        if not saved_yaml.is_file():
            raise KDError(f"stage {stage.run} has its output {stage.output} but no {saved_yaml}, so its settings "
                          f"cannot be checked; delete {stage.log_dir} and {stage.checkpoint_dir} to run it again")
        diff = config_diff(to_dict(OmegaConf.load(saved_yaml)), to_dict(stage.resolve()))
        was = self.stages.get(stage.run, {}).get("nproc")
        if was is not None and was != nproc:
            diff.append(("nproc", was, nproc))
        if diff:
            changes = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diff)
            raise KDError(f"stage {stage.run} already finished with other settings ({changes}). Restore them, or "
                          f"delete {stage.log_dir} and {stage.checkpoint_dir} to run it again (and the stages "
                          f"that use it).")

    def add_minutes(self, stage: Stage, nproc: int, minutes: float, finished: bool) -> None:
        entry = self.stages.setdefault(stage.run, {"kind": stage.kind, "minutes": 0.0})
        entry["minutes"] = round(entry["minutes"] + minutes, 2)
        if finished:
            entry.update(argv=stage.argv, nproc=nproc)
        write_json(str(self.path), self.stages)


def torchrun_command(stage: Stage, nproc: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / stage.script), *stage.argv[1:]]


def run_subprocess(stage: Stage, nproc: int, out_path: Path) -> int:
    """Run a stage under torchrun, appending its output to out_path. SIGTERM/SIGINT are passed on,
    so a pretraining run saves a checkpoint before the driver exits."""
    command = torchrun_command(stage, nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(out_path, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
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
               runner: Callable[[Stage, int, Path], int] = run_subprocess, say=print) -> Dict[str, float]:
    """Run what is not done yet; returns minutes per stage as recorded in stages.json."""
    out_dir = log_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = StageRecord(out_dir / "stages.json")
    for i, stage in enumerate(stages, 1):
        prefix = f"[{i}/{len(stages)}] {stage.run} ({stage.kind})"
        if stage.output.exists():
            record.check_unchanged(stage, cfg.nproc)
            say(f"{prefix}: done before, skipped")
            continue
        out_path = out_dir / f"{stage.run}.out"
        say(f"{prefix}: running, output in {out_path}")
        started = time.time()
        code = runner(stage, cfg.nproc, out_path)
        minutes = (time.time() - started) / 60
        finished = code == 0 and stage.output.exists()
        record.add_minutes(stage, cfg.nproc, minutes, finished)
        if not finished:
            why = f"exit code {code}" if code else f"it exited without writing {stage.output}"
            raise KDError(f"stage {stage.run} failed ({why}) after {minutes:.1f} min. Last lines of "
                          f"{out_path}:\n{tail(out_path)}\nFix the cause and rerun: finished stages are skipped "
                          f"and an interrupted pretraining run resumes from its last checkpoint.")
        say(f"{prefix}: finished in {minutes:.1f} min")
    return {run: entry["minutes"] for run, entry in record.stages.items()}
