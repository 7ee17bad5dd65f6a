"""Equal compute: held-out loss against training FLOPs and seconds for the ways of paying for a teacher.

FLOPs are counted (kd/flops.py): 3x the student forward (forward + backward) per step, plus the
teacher forward for online KD, at the masked positions or at every position as the recipe computes
them; a teacher cache costs one teacher forward per block and mask draw, once, before training.

Seconds are measured, not read from the runs' logs: the runs shared this machine with other work,
so their wall-clock says as much about that as about the recipe. After the runs, one process times
a full training step (forwards, losses, backward, AdamW) of each recipe on the study's batch, with
the exported models, round robin, and keeps the median; the cache's one-off cost is the measured
time of a teacher forward + top-k per batch times the batches it took.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from kd.config import PretrainConfig, load_config
from kd.data.masking import MaskingSpec, mask_batch, num_predictions
from kd.flops import config_flops
from kd.report.runs import load_run

log = logging.getLogger(__name__)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


class Recipe:
    """One equal-compute run: its config, model shapes and cost per step."""

    def __init__(self, name: str, logs: Path, runs_root: Path):
        self.name = name
        self.cfg = load_config(PretrainConfig, str(logs / name / "config.yaml"), [])
        info = _json(logs / name / "run.json")
        self.batch, self.seq = info["global_batch"], self.cfg.data.seq_len
        self.student_dir = runs_root / name / "final"
        self.student = _json(self.student_dir / "config.json")
        self.teacher_dir = Path(self.cfg.teacher.name) if self.cfg.teacher.name else None
        self.teacher = _json(self.teacher_dir / "config.json") if self.teacher_dir else None
        self.cache = Path(self.cfg.teacher_cache.path) if self.cfg.teacher_cache.path and self.cfg.loss.alpha_kd else None
        self.online = self.cache is None and (self.cfg.loss.alpha_kd > 0 or self.cfg.loss.alpha_hidden > 0)
        self.run = load_run(logs / name)

    @property
    def predicted(self) -> int:
        per_block = num_predictions(self.seq, self.cfg.data.mlm_probability)
        return self.batch * (per_block if self.cfg.loss.kd_positions == "masked" else self.seq)

    def step_flops(self) -> float:
        tokens = self.batch * self.seq
        flops = 3 * config_flops(self.student, self.seq, tokens, self.predicted)
        if self.online:
            flops += config_flops(self.teacher, self.seq, tokens, self.predicted)
        return flops

    def cache_blocks(self) -> int:
        """Blocks the teacher ran over to make the cache: every train block per draw, + validation."""
        manifest = _json(self.cache / "manifest.json")
        return sum(int(s["rows"]) for s in manifest["shards"].values())

    def setup_flops(self) -> float:
        if self.cache is None:
            return 0.0
        per_block = num_predictions(self.seq, self.cfg.data.mlm_probability)
        return self.cache_blocks() * config_flops(self.teacher, self.seq, self.seq, per_block)

    def curve(self) -> list:
        return [[int(r["step"]), r["eval/mlm_ce"]] for r in self.run.records if "eval/mlm_ce" in r]


def _batch(recipe: Recipe, vocab: int, k: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randint(1000, vocab, (recipe.seq,), generator=gen) for _ in range(recipe.batch)]
    spec = MaskingSpec(mask_token_id=103, vocab_size=vocab, special_ids=(0, 100, 101, 102, 103))
    batch = mask_batch(blocks, range(recipe.batch), spec, 0)
    if recipe.cache is not None:  # synthetic top-k rows of the cache's shapes: timing only
        p = batch["masked_positions"].shape[1]
        batch["teacher_topk_ids"] = torch.randint(0, vocab, (recipe.batch, p, k), generator=gen)
        batch["teacher_topk_logits"] = torch.randn(recipe.batch, p, k, generator=gen).sort(-1, descending=True).values
        batch["teacher_lse"] = torch.zeros(recipe.batch, p)
    return batch


def _train_step(recipe: Recipe, teacher) -> Callable[[], None]:
    from transformers import BertForMaskedLM

    from kd.optim import build_optimizer
    from kd.models import DistillationStudent
    from kd.objective import distill_loss, make_plan
    from kd.pretrain import hidden_pairs_for

    student = BertForMaskedLM.from_pretrained(recipe.student_dir, attn_implementation="sdpa").float()
    num_teacher = recipe.teacher["num_hidden_layers"] if recipe.online else None
    pairs = hidden_pairs_for(recipe.cfg, num_teacher, student.config.num_hidden_layers)
    plan = make_plan(recipe.cfg.loss, pairs, from_cache=recipe.cache is not None)
    module = DistillationStudent(student, plan.hidden_pairs, recipe.teacher["hidden_size"] if recipe.online else None)
    optimizer = build_optimizer(module, recipe.cfg.train, torch.device("cpu"))
    batch = _batch(recipe, student.config.vocab_size, recipe.cfg.teacher_cache.topk)
    live_teacher = teacher if plan.use_teacher else None

    def step():
        loss, _ = distill_loss(module, live_teacher, batch, plan)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _cache_batch_step(recipe: Recipe, teacher) -> Callable[[], None]:
    from kd.teacher_cache.generate import teacher_topk
    batch = _batch(recipe, recipe.teacher["vocab_size"], recipe.cfg.teacher_cache.topk)
    return lambda: teacher_topk(teacher, teacher.cls, batch["input_ids"], batch["masked_positions"],
                                recipe.cfg.teacher_cache.topk, recipe.cfg.loss.temperature)


def time_round_robin(steps: Dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each callable, called in turn so that outside load hits all alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def equal_compute(names: Dict[str, str], logs: Path, runs_root: Path, rounds: int = 7) -> dict:
    """names: role -> run (nokd, kd_masked, kd_all_positions, kd_cache). Returns, per role, the run,
    FLOPs and measured seconds per step, the one-off setup cost and the held-out loss curve."""
    from transformers import BertForMaskedLM

    recipes = {role: Recipe(run, logs, runs_root) for role, run in names.items()
               if run and (logs / run / "run.json").is_file() and (runs_root / run / "final").is_dir()}
    if not recipes:
        return {}
    teacher_dir = next((r.teacher_dir for r in recipes.values() if r.teacher_dir), None)
    teacher = BertForMaskedLM.from_pretrained(teacher_dir, attn_implementation="sdpa").float().eval()
    teacher.requires_grad_(False)
    steps = {role: _train_step(r, teacher) for role, r in recipes.items()}
    cached = [r for r in recipes.values() if r.cache is not None]
    if cached:
        steps["cache_generation_batch"] = _cache_batch_step(cached[0], teacher)
    threads = torch.get_num_threads()
    log.info("equal compute: timing %s, %d rounds, %d threads", ", ".join(steps), rounds, threads)
    seconds = time_round_robin(steps, rounds)
    out = {"timing": {"rounds": rounds, "threads": threads, "batch": next(iter(recipes.values())).batch,
                      "method": "one process, each recipe's full training step on the exported models, "
                                "round robin, median"},
           "runs": {}}
    for role, r in recipes.items():
        setup_s = 0.0
        if r.cache is not None:
            setup_s = seconds["cache_generation_batch"] * r.cache_blocks() / r.batch
        out["runs"][role] = {"run": r.name, "flops_per_step": r.step_flops(), "seconds_per_step": seconds[role],
                             "setup_flops": r.setup_flops(), "setup_seconds": setup_s, "curve": r.curve()}
    return out
