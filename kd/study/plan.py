"""Study config -> the ordered list of stages, each one ordinary command.

Order: caches and pretraining runs as listed (a run may only name earlier runs as its teacher, init or
cache), then fine-tunes, then the levers' runs in the same order when asked for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from kd.config import load_config
from kd.errors import KDError
from kd.study.spec import ExperimentConfig, Section


@dataclass
class Stage:
    run: str
    kind: str                           # pretrain | finetune | cache
    group: str                          # the spec's name: kd for kd-s0, kd-s1, ...; fine-tune group
    seed: Optional[int]
    lever: bool
    argv: List[str]                     # script, --config PRESET, overrides (torchrun is added when run)
    nproc: int
    output: Path                        # exists once the stage has finished
    log_dir: Path                       # where the run writes config.yaml, metrics.jsonl, ...
    checkpoint_dir: Path                # its checkpoints and export (a cache: the cache folder)

    @property
    def script(self) -> str:
        return self.argv[0]

    def schema(self) -> type:
        if self.script == "finetuneit.py":
            from kd.finetune import FinetuneConfig
            return FinetuneConfig
        from kd.config import PretrainConfig
        return PretrainConfig

    def resolve(self):
        """The config the run will resolve to, as the script itself resolves it."""
        return load_config(self.schema(), self.argv[2], self.argv[3:])

    def done(self) -> bool:
        if self.kind == "cache":  # the manifest exists from the start; it says when it is complete
            return self.output.is_file() and bool(json.loads(self.output.read_text()).get("complete"))
        return self.output.exists()


def run_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.checkpoint_dir) / cfg.name


def export_dir(cfg: ExperimentConfig, run: str, step: Optional[int] = None) -> Path:
    """A run's final export, or the copy exported at `step` (train.export_steps)."""
    return run_root(cfg) / run / ("final" if step is None else f"export_step_{step:06d}")


def log_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.log_dir) / cfg.name


def plots_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.plots_dir) / cfg.name


def seeded_name(name: str, seed: Optional[int]) -> str:
    return name if seed is None else f"{name}-s{seed}"


def finetune_run(group: str, seed: int) -> str:
    return f"{group}-tweets-s{seed}"


def split_ref(ref: str):
    """`teacher@300` -> ("teacher", 300); `teacher` -> ("teacher", None)."""
    name, _, step = ref.partition("@")
    if step and not step.isdigit():
        raise KDError(f"{ref!r}: write a run's export at a step as run@STEP, e.g. teacher@300")
    return name, int(step) if step else None


class _Planner:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.stages: List[Stage] = []
        self.pretrain_seeds: Dict[str, List[Optional[int]]] = {}  # group -> seeds of its runs
        self.caches: Dict[str, Path] = {}
        self.finetunes: List[str] = []
        self.dirs = [f"log_dir={log_dir(cfg)}", f"checkpoint_dir={run_root(cfg)}"]

    def _single_run(self, run: str, role: str, ref: str) -> str:
        """An earlier pretraining run named as a teacher or init: it must be a single (unseeded) run,
        or name one seed explicitly (kd-s0)."""
        name, _ = split_ref(ref)
        runs = {seeded_name(g, s): g for g, seeds in self.pretrain_seeds.items() for s in seeds}
        if name not in runs:
            raise KDError(f"run {run!r} names {role} {ref!r}, which is not an earlier run of the study "
                          f"(earlier runs: {', '.join(runs) or 'none'})")
        return name

    def _export_of(self, run: str, role: str, ref: str) -> Path:
        name = self._single_run(run, role, ref)
        return export_dir(self.cfg, name, split_ref(ref)[1])

    def cache(self, name: str, spec, lever: bool) -> None:
        folder = run_root(self.cfg) / name
        argv = ["cache_teacher.py", "--config", spec.config, f"run_name={name}", *self.dirs,
                f"teacher.name={self._export_of(name, 'teacher', spec.teacher)}",
                f"teacher_cache.path={folder}", *self.cfg.pretrain_overrides, *spec.overrides]
        self.caches[name] = folder
        self.stages.append(Stage(name, "cache", name, None, lever, argv, self.cfg.nproc, folder / "manifest.json",
                                 log_dir(self.cfg) / name, folder))

    def pretrain(self, group: str, spec, lever: bool) -> None:
        if group in self.pretrain_seeds or group in self.caches:
            raise KDError(f"two runs of the study are called {group!r}; give each its own name")
        wiring = []
        if spec.teacher:
            wiring.append(f"teacher.name={self._export_of(group, 'teacher', spec.teacher)}")
        if spec.layers_from:
            wiring.append(f"student.init_layers_from={self._export_of(group, 'layers_from', spec.layers_from)}")
        if spec.init_from:
            wiring.append(f"student.init=pretrained:{self._export_of(group, 'init_from', spec.init_from)}")
        if spec.teacher_cache:
            if spec.teacher_cache not in self.caches:
                raise KDError(f"run {group!r} names teacher_cache {spec.teacher_cache!r}, which is not an earlier "
                              f"cache of the study ({', '.join(self.caches) or 'none'})")
            wiring.append(f"teacher_cache.path={self.caches[spec.teacher_cache]}")
        seeds = list(spec.seeds) or [None]
        for seed in seeds:
            run = seeded_name(group, seed)
            argv = ["ddp_main.py", "--config", spec.config, f"run_name={run}", *self.dirs, *wiring,
                    *self.cfg.pretrain_overrides, *([f"train.seed={seed}"] if seed is not None else []),
                    *spec.overrides]
            self.stages.append(Stage(run, "pretrain", group, seed, lever, argv, self.cfg.nproc,
                                     export_dir(self.cfg, run) / "config.json", log_dir(self.cfg) / run,
                                     run_root(self.cfg) / run))
        self.pretrain_seeds[group] = seeds

    def finetune(self, group: str, spec, lever: bool) -> None:
        ft = self.cfg.finetune
        if spec.model not in self.pretrain_seeds:
            raise KDError(f"fine-tune {group!r} names model {spec.model!r}, which is not a pretraining run of the "
                          f"study ({', '.join(self.pretrain_seeds)})")
        model_seeds = self.pretrain_seeds[spec.model]
        if model_seeds != [None] and spec.seeds:
            raise KDError(f"fine-tune {group!r}: {spec.model!r} has pretraining seeds {model_seeds}, and each is "
                          f"fine-tuned with its own seed; remove `seeds` from {group!r}")
        pairs = [(seeded_name(spec.model, s), s) for s in model_seeds] if model_seeds != [None] else \
            [(spec.model, s) for s in (spec.seeds or ft.seeds)]
        teacher = []
        if spec.task_teacher:
            if spec.task_teacher not in self.finetunes:
                raise KDError(f"fine-tune {group!r} names task_teacher {spec.task_teacher!r}, which is not an "
                              f"earlier fine-tune run of the study ({', '.join(self.finetunes) or 'none'})")
            teacher = [f"distill.teacher={export_dir(self.cfg, spec.task_teacher)}"]
        group = spec.group or group
        for model, seed in pairs:
            run = finetune_run(group, seed)
            argv = ["finetuneit.py", "--config", ft.config, f"run_name={run}", *self.dirs,
                    f"model={export_dir(self.cfg, model)}", f"train.seed={seed}", *teacher, *ft.overrides,
                    *spec.overrides]
            self.stages.append(Stage(run, "finetune", group, seed, lever, argv, self.cfg.finetune_nproc,
                                     log_dir(self.cfg) / run / "results.json", log_dir(self.cfg) / run,
                                     run_root(self.cfg) / run))
            self.finetunes.append(run)

    def section(self, caches, pretrain, finetune, lever: bool) -> None:
        for name, spec in caches.items():
            self.cache(name, spec, lever)
        for name, spec in pretrain.items():
            self.pretrain(name, spec, lever)
        for name, spec in finetune.items():
            self.finetune(name, spec, lever)


def plan(cfg: ExperimentConfig) -> List[Stage]:
    """Every stage in order: the headline runs, then the levers' when run_levers is set."""
    planner = _Planner(cfg)
    planner.section({}, cfg.pretrain, cfg.finetune.runs, lever=False)
    levers: Section = cfg.levers
    if cfg.run_levers:
        planner.section(levers.caches, levers.pretrain, levers.finetune, lever=True)
    names = [s.run for s in planner.stages]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise KDError(f"the study would run {', '.join(twice)} twice; give each run its own name")
    return planner.stages
