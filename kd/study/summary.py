"""The study's logs -> summary.json: every number the README reports, and nothing chosen by hand.

Each pretraining run is scored by its last evaluation (the whole held-out split, the same masks for
every run); each fine-tune by its test accuracy. Seeded runs are aggregated per group, every seed
kept; the pre-registered comparisons are judged under the noise rule (kd/study/stats.py).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from kd.config import PretrainConfig, load_config
from kd.plots.style import is_number
from kd.report.benchmarks import PUBLISHED
from kd.report.runs import Run, load_run
from kd.study.plan import Stage, split_ref
from kd.study.spec import METRICS, ExperimentConfig
from kd.study.stats import judge, spread

log = logging.getLogger(__name__)


def final_eval(run: Run) -> dict:
    """The last evaluation of a pretraining run: the one on its final weights."""
    evals = [r for r in run.records if "eval/mlm_ce" in r]
    if not evals:
        return {}
    last = evals[-1]
    return {"step": int(last["step"]), "tokens_seen": last.get("tokens_seen"),
            "heldout_mlm_loss": last["eval/mlm_ce"], "perplexity": last.get("eval/perplexity"),
            "masked_accuracy_pct": last.get("eval/masked_accuracy"),
            "teacher_agreement_pct": last.get("eval/teacher_agreement")}


def eval_at(run: Run, step: Optional[int]) -> Optional[float]:
    """Held-out MLM loss at `step` (None: the last eval); None when the run has no eval there."""
    evals = {int(r["step"]): r["eval/mlm_ce"] for r in run.records if "eval/mlm_ce" in r}
    if not evals:
        return None
    return evals[max(evals)] if step is None else evals.get(step)


def _init_layers(cfg) -> Optional[list]:
    """The teacher layers a teacher_layers init copied (the default needs the teacher's depth)."""
    if cfg.student.init != "teacher_layers":
        return None
    if cfg.student.init_layers:
        return list(cfg.student.init_layers)
    teacher_config = Path(cfg.student.init_layers_from or cfg.teacher.name or "") / "config.json"
    if not teacher_config.is_file():
        return None
    from kd.models import default_init_layers
    depth = json.loads(teacher_config.read_text())["num_hidden_layers"]
    return default_init_layers(depth, cfg.student.num_layers)


def recipe(config_yaml: Path) -> dict:
    """What distinguishes a pretraining run: init, teacher, loss (from the config it ran with)."""
    cfg = load_config(PretrainConfig, str(config_yaml), [])
    loss = cfg.loss
    uses_teacher = loss.alpha_kd or loss.alpha_hidden or cfg.student.init in ("teacher_layers", "pruned")
    return {"init": cfg.student.init, "init_layers": _init_layers(cfg),
            "init_layers_from": cfg.student.init_layers_from if cfg.student.init == "teacher_layers" else None,
            "teacher": cfg.teacher.name if uses_teacher else None,
            "teacher_cache": cfg.teacher_cache.path, "num_layers": cfg.student.num_layers,
            "hidden_size": cfg.student.hidden_size, "num_heads": cfg.student.num_heads,
            "intermediate_size": cfg.student.intermediate_size, "alpha_mlm": loss.alpha_mlm, "alpha_kd": loss.alpha_kd,
            "alpha_hidden": loss.alpha_hidden, "temperature": loss.temperature, "hidden_loss": loss.hidden_loss,
            "kd_positions": loss.kd_positions, "alpha_attn_kl": loss.alpha_attn_kl,
            "alpha_relation_kl": loss.alpha_relation_kl, "relation_heads": loss.relation_heads,
            "alpha_attn_mse": loss.alpha_attn_mse, "max_steps": cfg.train.max_steps, "seq_len": cfg.data.seq_len,
            "train_seed": cfg.train.seed}


def pretraining_rows(logs: Path, stages: List[Stage]) -> List[dict]:
    rows = []
    for stage in stages:
        if stage.kind != "pretrain" or not (logs / stage.run / "config.yaml").is_file():
            continue
        run = load_run(logs / stage.run)
        rows.append({"run": stage.run, "group": stage.group, "seed": stage.seed, "lever": stage.lever,
                     **recipe(logs / stage.run / "config.yaml"), **final_eval(run),
                     "global_batch": run.info.get("global_batch"),
                     "num_parameters": run.info.get("num_parameters")})
    return rows


def pretraining_groups(rows: List[dict]) -> List[dict]:
    """Per group (a run and its seeds): mean, std and every seed of each held-out metric."""
    groups: Dict[str, List[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    out = []
    for group, members in groups.items():
        entry = {"group": group, "lever": members[0]["lever"], "runs": [m["run"] for m in members],
                 "recipe": {k: members[0][k] for k in ("init", "init_layers", "init_layers_from", "teacher",
                                                       "teacher_cache",
                                                       "num_layers", "hidden_size", "num_heads",
                                                       "intermediate_size", "alpha_mlm", "alpha_kd",
                                                       "alpha_hidden", "temperature", "hidden_loss",
                                                       "kd_positions", "alpha_attn_kl", "alpha_relation_kl",
                                                       "relation_heads", "alpha_attn_mse")},
                 "num_parameters": members[0].get("num_parameters")}
        for key in ("heldout_mlm_loss", "masked_accuracy_pct", "teacher_agreement_pct"):
            values = {str(m["seed"]): m[key] for m in members if is_number(m.get(key))}
            entry[key] = spread(values) if values else None
        out.append(entry)
    return out


def _validation_curve(run: Run) -> Dict[int, float]:
    return {int(r["step"]): r["eval/accuracy"] for r in run.records if is_number(r.get("eval/accuracy"))}


def finetune_groups(logs: Path, stages: List[Stage]) -> tuple:
    """Per fine-tune group: test and validation accuracy over its seeds (every seed, none dropped),
    the mean validation curve, and each split's majority-class accuracy (the floor to beat)."""
    groups: Dict[str, dict] = {}
    majority = {}
    for stage in stages:
        if stage.kind != "finetune":
            continue
        run = load_run(stage.log_dir)
        res = run.results or {}
        if "test" not in res:
            continue
        entry = groups.setdefault(stage.group, {"group": stage.group, "lever": stage.lever, "runs": [],
                                                "test": {}, "validation": {}, "curves": {}, "examples": set()})
        seed = str(stage.seed)
        entry["runs"].append(stage.run)
        entry["test"][seed] = res["test"]["accuracy"]
        entry["validation"][seed] = res["validation"]["accuracy"]
        entry["curves"][seed] = _validation_curve(run)
        entry["examples"].add(res["test"]["examples"])
        entry["model"] = re.sub(r"-s\d+$", "", Path(res.get("model", "")).parent.name)  # the group, not one seed
        entry["task_teacher"] = Path(res["task_teacher"]).parent.name if res.get("task_teacher") else None
        entry["num_parameters"] = res.get("num_parameters")
        majority = res.get("majority_class_pct") or majority
    out = []
    for entry in groups.values():
        steps = sorted(set.intersection(*(set(c) for c in entry["curves"].values())))
        curve = {s: sum(c[s] for c in entry["curves"].values()) / len(entry["curves"]) for s in steps}
        out.append({"group": entry["group"], "lever": entry["lever"], "runs": entry["runs"],
                    "model": entry.get("model"), "task_teacher": entry.get("task_teacher"),
                    "num_parameters": entry.get("num_parameters"),
                    "test_accuracy_pct": spread(entry["test"]),
                    "validation_accuracy_pct": spread(entry["validation"]),
                    "validation_curve": {str(s): v for s, v in curve.items()},
                    "test_examples": sorted(entry["examples"])})
    return out, majority


def comparisons(cfg: ExperimentConfig, pre_groups: List[dict], ft_groups: List[dict]) -> List[dict]:
    """The pre-registered questions, each judged under the noise rule; skipped if an arm is missing."""
    by_metric = {"heldout_mlm_loss": {g["group"]: (g["heldout_mlm_loss"] or {}).get("per_seed") for g in pre_groups},
                 "test_accuracy": {g["group"]: g["test_accuracy_pct"]["per_seed"] for g in ft_groups}}
    out = []
    for c in cfg.comparisons:
        a, b = by_metric[c.metric].get(c.a), by_metric[c.metric].get(c.b)
        if not a or not b:
            log.warning("comparison %s vs %s (%s): an arm has no results yet", c.a, c.b, c.metric)
            continue
        out.append({"question": c.question, "a": c.a, "b": c.b, "metric": c.metric,
                    "better": METRICS[c.metric],
                    **judge(a, b, METRICS[c.metric] == "lower", cfg.noise_rule.std_multiple,
                            cfg.noise_rule.paired_alpha)})
    return out


def dose_response(cfg: ExperimentConfig, logs: Path, pre_groups: List[dict]) -> List[dict]:
    """Per teacher quality: the teacher's held-out loss, its lead over the no-KD student, and the KD
    gain (no-KD loss - KD loss) of each seed pair."""
    groups = {g["group"]: g for g in pre_groups}
    out = []
    for level in cfg.dose_response:
        teacher, step = split_ref(level.teacher)
        kd, nokd = groups.get(level.kd), groups.get(level.nokd)
        teacher_loss = eval_at(load_run(logs / teacher), step) if (logs / teacher).is_dir() else None
        if teacher_loss is None or not kd or not nokd or not kd["heldout_mlm_loss"] or not nokd["heldout_mlm_loss"]:
            log.warning("dose-response level %s: runs missing", level.teacher)
            continue
        kd_seeds, nokd_seeds = kd["heldout_mlm_loss"]["per_seed"], nokd["heldout_mlm_loss"]["per_seed"]
        gains = {s: nokd_seeds[s] - kd_seeds[s] for s in sorted(set(kd_seeds) & set(nokd_seeds))}
        out.append({"teacher": level.teacher, "teacher_loss": teacher_loss, "kd": level.kd, "nokd": level.nokd,
                    "nokd_loss": nokd["heldout_mlm_loss"]["mean"], "kd_loss": kd["heldout_mlm_loss"]["mean"],
                    "teacher_lead": nokd["heldout_mlm_loss"]["mean"] - teacher_loss, "kd_gain": spread(gains)})
    return out


def two_by_two(cfg: ExperimentConfig, ft_groups: List[dict]) -> dict:
    groups = {g["group"]: g for g in ft_groups}
    cells = {}
    for cell in ("both", "pretrain_kd_only", "task_kd_only", "neither", "teacher"):
        name = getattr(cfg.two_by_two, cell)
        if name and name in groups:
            cells[cell] = {"group": name, **groups[name]["test_accuracy_pct"]}
    return cells


def speed_rows(bench_csv: Path, models: List[str]) -> dict:
    """CPU latency and throughput of the exported models, from compare_benchmarks' table."""
    if not bench_csv.is_file():
        return {}
    table = pd.read_csv(bench_csv)
    out = {}
    for row in table[table["source"] == "measured"].to_dict("records"):
        if row["model"] in models:
            out[row["model"]] = {k: (row[k] if is_number(row.get(k)) else None) for k in
                                 ("params_M", "latency_ms_b1", "throughput_seq_s_b32")}
    return out


def build_summary(cfg: ExperimentConfig, stages: List[Stage], minutes: dict, logs: Path, plots: Path,
                  equal_compute: Optional[dict] = None, config_path: str = "configs/experiment.yaml") -> dict:
    rows = pretraining_rows(logs, stages)
    speeds = speed_rows(plots / "benchmarks.csv", [r["run"] for r in rows])
    for row in rows:
        row.update({f"cpu_{k}": v for k, v in speeds.get(row["run"], {}).items() if k != "params_M"})
    pre_groups = pretraining_groups(rows)
    ft_groups, majority = finetune_groups(logs, stages)
    headline = {s.run for s in stages if not s.lever}
    levers = {s.run for s in stages if s.lever}
    return {
        "config": config_path, "name": cfg.name, "nproc": cfg.nproc,
        "finetune_nproc": cfg.finetune_nproc,
        "noise_rule": {"std_multiple": cfg.noise_rule.std_multiple, "paired_alpha": cfg.noise_rule.paired_alpha},
        "finetune_overrides": list(cfg.finetune.overrides),
        "pretraining": rows, "pretraining_groups": pre_groups,
        "finetune_groups": ft_groups, "majority_class_pct": majority,
        "comparisons": comparisons(cfg, pre_groups, ft_groups),
        "two_by_two": two_by_two(cfg, ft_groups),
        "dose_response": dose_response(cfg, logs, pre_groups),
        "equal_compute": equal_compute or {},
        "published": PUBLISHED,
        "minutes": {k: v for k, v in minutes.items() if k in headline | levers},
        "total_minutes": round(sum(v for k, v in minutes.items() if k in headline), 1),
        "lever_minutes": round(sum(v for k, v in minutes.items() if k in levers), 1),
    }
