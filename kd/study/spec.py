"""The study's config: which runs, with which seeds, compared how (configs/experiment.yaml).

A pretraining run with `seeds` becomes one run per seed, `<name>-s<seed>`, with `train.seed=<seed>`:
the seed sets the data order and dropout; every block's masks come from data.mask_seed, so all runs
are scored on the same held-out masks and twins (same seed) see the same batches with the same masks.
A fine-tune of a seeded model runs once per pretraining seed with the same seed (a paired design);
a model without seeds is fine-tuned with `finetune.seeds`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from kd.config import load_config
from kd.errors import KDError


@dataclass
class CacheSpec:
    """A top-k teacher cache (cache_teacher.py) made from an earlier run's export."""
    config: str = "???"
    teacher: str = "???"
    overrides: List[str] = field(default_factory=list)


@dataclass
class RunSpec:
    """A pretraining run (ddp_main.py)."""
    config: str = "???"
    teacher: Optional[str] = None       # an earlier run (or `run@step`, an export during it) that teaches
    init_from: Optional[str] = None     # an earlier run whose export is the starting weights
    layers_from: Optional[str] = None   # an earlier run whose layers a teacher_layers init copies (default:
                                        # the teacher's), so students of weaker teachers share one init
    teacher_cache: Optional[str] = None  # a cache of the study: KD from its rows instead of a live teacher
    seeds: List[int] = field(default_factory=list)  # empty: one run, train.seed from the preset
    overrides: List[str] = field(default_factory=list)


@dataclass
class FinetuneRun:
    """Fine-tunes of one pretraining run: one per pretraining seed, or one per `finetune.seeds`."""
    model: str = "???"
    task_teacher: Optional[str] = None  # an earlier fine-tune run (e.g. teacher-tweets-s0): task-level KD
    seeds: List[int] = field(default_factory=list)  # only for a model without seeds; default finetune.seeds
    overrides: List[str] = field(default_factory=list)
    group: Optional[str] = None         # report the runs under this group (e.g. more seeds of a headline
                                        # group, run as a lever); default: this entry's own name


@dataclass
class FinetuneSection:
    config: str = "configs/finetune_tweets.yaml"
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: List[str] = field(default_factory=list)
    runs: Dict[str, FinetuneRun] = field(default_factory=dict)


@dataclass
class Comparison:
    """A question fixed before the runs: does `a` beat `b` on `metric`, beyond noise?

    metric: heldout_mlm_loss (lower is better; pretraining runs) or test_accuracy (higher is better;
    fine-tune groups). Runs with seeds are paired by seed."""
    a: str = "???"
    b: str = "???"
    metric: str = "???"
    question: str = ""


@dataclass
class DoseLevel:
    """One teacher quality of the dose-response: the teacher (run or run@step) and its twins."""
    teacher: str = "???"
    kd: str = "???"
    nokd: str = "???"


@dataclass
class EqualCompute:
    """Runs drawn as held-out loss against FLOPs and seconds (names of pretraining runs, or empty)."""
    nokd: Optional[str] = None
    kd_masked: Optional[str] = None
    kd_all_positions: Optional[str] = None
    kd_cache: Optional[str] = None


@dataclass
class TwoByTwo:
    """Fine-tune groups of {pretraining KD, none} x {task KD, none}."""
    both: Optional[str] = None
    pretrain_kd_only: Optional[str] = None
    task_kd_only: Optional[str] = None
    neither: Optional[str] = None
    teacher: Optional[str] = None


@dataclass
class NoiseRule:
    """A difference is a win only if it exceeds std_multiple x the pooled std of the two arms, or a
    paired t-test over seeds gives p < paired_alpha (two-sided)."""
    std_multiple: float = 2.0
    paired_alpha: float = 0.05


@dataclass
class Section:
    caches: Dict[str, CacheSpec] = field(default_factory=dict)
    pretrain: Dict[str, RunSpec] = field(default_factory=dict)
    finetune: Dict[str, FinetuneRun] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    nproc: int = 2                      # torchrun processes of pretraining and cache runs
    finetune_nproc: int = 2             # of fine-tunes (their small batches gain little from DDP on CPU)
    log_dir: str = "logs"               # runs go to <log_dir>/<name>/<run>, and so on
    checkpoint_dir: str = "checkpoints"
    plots_dir: str = "plots"
    pretrain_overrides: List[str] = field(default_factory=list)
    pretrain: Dict[str, RunSpec] = field(default_factory=dict)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    levers: Section = field(default_factory=Section)
    run_levers: bool = False            # also run the `levers` runs
    noise_rule: NoiseRule = field(default_factory=NoiseRule)
    comparisons: List[Comparison] = field(default_factory=list)
    dose_response: List[DoseLevel] = field(default_factory=list)
    equal_compute: EqualCompute = field(default_factory=EqualCompute)
    two_by_two: TwoByTwo = field(default_factory=TwoByTwo)


METRICS = {"heldout_mlm_loss": "lower", "test_accuracy": "higher"}


def load_experiment(path: str, overrides: List[str]) -> ExperimentConfig:
    cfg = load_config(ExperimentConfig, path, overrides)
    if min(cfg.nproc, cfg.finetune_nproc) < 1:
        raise KDError(f"nproc={cfg.nproc} and finetune_nproc={cfg.finetune_nproc} must be >= 1")
    if not cfg.pretrain:
        raise KDError(f"{path} lists no pretraining runs under `pretrain:`")
    for c in cfg.comparisons:
        if c.metric not in METRICS:
            raise KDError(f"comparison {c.a} vs {c.b}: metric={c.metric!r} is not one of {sorted(METRICS)}")
    return cfg
