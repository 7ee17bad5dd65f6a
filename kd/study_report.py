"""Numbers, table and figure of the offline study (kd/experiment.py) from its logs.

summary.json holds every number of the README's Results table; results.md is that table, made
from summary.json by `render_markdown`, so the README can be checked against the file.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

import pandas as pd

from kd import report
from kd.config import load_config, PretrainConfig
from kd.logger import write_json
from kd.plots import _figure, _save, _style, is_number, run_colors

log = logging.getLogger(__name__)


def _final_eval(run: report.Run) -> dict:
    """The last evaluation of a pretraining run: the one on its final weights."""
    evals = [r for r in run.records if "eval/mlm_ce" in r]
    if not evals:
        return {}
    last = evals[-1]
    return {"step": int(last["step"]), "tokens_seen": last.get("tokens_seen"),
            "heldout_mlm_loss": last["eval/mlm_ce"], "perplexity": last.get("eval/perplexity"),
            "masked_accuracy_pct": last.get("eval/masked_accuracy"),
            "teacher_agreement_pct": last.get("eval/teacher_agreement")}


def _init_layers(cfg) -> list[int] | None:
    """The teacher layers a teacher_layers init copied (the default needs the teacher's depth)."""
    if cfg.student.init != "teacher_layers":
        return None
    if cfg.student.init_layers:
        return list(cfg.student.init_layers)
    teacher_config = Path(cfg.teacher.name or "") / "config.json"
    if not teacher_config.is_file():
        return None
    from kd.models import default_init_layers
    depth = json.loads(teacher_config.read_text())["num_hidden_layers"]
    return default_init_layers(depth, cfg.student.num_layers)


def _recipe(config_yaml: Path) -> dict:
    """What distinguishes the run: init, teacher, loss weights (from the config it ran with)."""
    cfg = load_config(PretrainConfig, str(config_yaml), [])
    loss = cfg.loss
    uses_teacher = loss.alpha_kd or loss.alpha_hidden or cfg.student.init == "teacher_layers"
    return {"init": cfg.student.init, "init_layers": _init_layers(cfg),
            "teacher": cfg.teacher.name if uses_teacher else None,
            "num_layers": cfg.student.num_layers, "alpha_mlm": loss.alpha_mlm, "alpha_kd": loss.alpha_kd,
            "alpha_hidden": loss.alpha_hidden, "temperature": loss.temperature, "hidden_loss": loss.hidden_loss,
            "hidden_layer_map": [list(p) for p in loss.hidden_layer_map] if loss.hidden_layer_map else None,
            "max_steps": cfg.train.max_steps, "seq_len": cfg.data.seq_len}


def pretraining_rows(logs: Path, runs: list[str]) -> list[dict]:
    rows = []
    for name in runs:
        run = report.load_run(logs / name)
        row = {"run": name, **_recipe(logs / name / "config.yaml"), **_final_eval(run)}
        row["global_batch"] = run.info.get("global_batch")
        row["num_parameters"] = run.info.get("num_parameters")
        rows.append(row)
    return rows


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def sentiment_rows(logs: Path, models: list[str], seeds: list[int], run_name) -> tuple[list[dict], dict]:
    """Per model: test and validation accuracy over the fine-tuning seeds (every seed, none dropped);
    and the majority-class accuracy of each split, the floor any model has to beat."""
    rows, majority = [], {}
    for model in models:
        test, val, examples = {}, {}, set()
        for seed in seeds:
            res = report.load_run(logs / run_name(model, seed)).results or {}
            if "test" in res:
                test[seed] = res["test"]["accuracy"]
                val[seed] = res["validation"]["accuracy"]
                examples.add(res["test"]["examples"])
                majority = res.get("majority_class_pct") or majority
        if len(test) != len(seeds):
            log.warning(f"{model}: fine-tune results for {len(test)} of {len(seeds)} seeds")
        if test:
            rows.append({"model": model, "test_accuracy_pct": {**_spread(list(test.values())), "per_seed": test},
                         "validation_accuracy_pct": {**_spread(list(val.values())), "per_seed": val},
                         "test_examples": sorted(examples)})
    return rows, majority


def speed_rows(bench_csv: Path, models: list[str]) -> dict:
    if not bench_csv.is_file():
        return {}
    table = pd.read_csv(bench_csv)
    out = {}
    for row in table[table["source"] == "measured"].to_dict("records"):
        if row["model"] in models:
            out[row["model"]] = {k: (row[k] if is_number(row.get(k)) else None) for k in
                                 ("params_M", "latency_ms_b1", "throughput_seq_s_b32")}
            out[row["model"]]["timed_on"] = row.get("device") if isinstance(row.get("device"), str) else None
    return out


def build_summary(cfg, stages, minutes: dict, logs: Path, plots: Path) -> dict:
    from kd.experiment import finetune_run

    main_runs = [s.run for s in stages if s.kind == "pretrain"]
    levers = [s.run for s in stages if s.kind == "lever"]
    speeds = speed_rows(plots / "benchmarks.csv", main_runs)
    pretraining = pretraining_rows(logs, main_runs)
    for row in pretraining:
        row.update({f"cpu_{k}": v for k, v in speeds.get(row["run"], {}).items() if k != "params_M"})
    main = {s.run for s in stages if s.kind != "lever"}
    lever_runs = {s.run for s in stages if s.kind == "lever"}
    sentiment, majority = sentiment_rows(logs, list(cfg.finetune.models), list(cfg.finetune.seeds), finetune_run)
    return {
        "config": "configs/experiment.yaml", "name": cfg.name, "nproc": cfg.nproc,
        "pretraining": pretraining,
        "sentiment": sentiment, "sentiment_majority_class_pct": majority,
        "finetune_overrides": list(cfg.finetune.overrides),
        "levers": pretraining_rows(logs, levers),
        "published": report.PUBLISHED,
        "minutes": {k: v for k, v in minutes.items() if k in main | lever_runs},
        "total_minutes": round(sum(v for k, v in minutes.items() if k in main), 1),
        "lever_minutes": round(sum(v for k, v in minutes.items() if k in lever_runs), 1),
    }


# ------------------------------------------------------------------------------------ rendering

def _f(value, digits=2) -> str:
    return f"{value:.{digits}f}" if is_number(value) else "—"


def _loss_recipe(row: dict) -> str:
    terms = [f"{row['alpha_mlm']:g}·CE"] if row["alpha_mlm"] else []
    if row["alpha_kd"]:
        terms.append(f"{row['alpha_kd']:g}·KL(T={row['temperature']:g})")
    if row["alpha_hidden"]:
        terms.append(f"{row['alpha_hidden']:g}·{row['hidden_loss']}")
    return " + ".join(terms)


def _init(row: dict) -> str:
    if row["init"] == "teacher_layers":
        return f"teacher layers {row['init_layers']}" if row.get("init_layers") else "teacher layers"
    if row["init"].startswith("pretrained:"):
        ref = Path(row["init"].split(":", 1)[1])
        if str(ref) == "packaged-minilm":
            return "MiniLM-L6-H384 (packaged)"
        return f"{ref.parent.name} (pretrained)" if ref.name == "final" else str(ref)
    return row["init"]


def _teacher(row: dict) -> str:
    # Exports are <checkpoint_dir>/<run>/final: name the run.
    return Path(row["teacher"]).parent.name if row.get("teacher") else "—"


def _pretrain_table(rows: list[dict], with_speed: bool) -> list[str]:
    head = ("| run | layers | init | teacher | loss | held-out MLM loss | perplexity | masked acc % "
            "| agrees with teacher % |")
    rule = "|:---|---:|:---|:---|:---|---:|---:|---:|---:|"
    if with_speed:
        head += " params (M) | CPU latency b1 (ms) |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['run']} | {r['num_layers']} | {_init(r)} | {_teacher(r)} | {_loss_recipe(r)} | {_f(r.get('heldout_mlm_loss'), 3)} "
                f"| {_f(r.get('perplexity'), 0)} | {_f(r.get('masked_accuracy_pct'))} "
                f"| {_f(r.get('teacher_agreement_pct'))} |")
        if with_speed:
            line += f" {_f(r['num_parameters'] / 1e6 if r.get('num_parameters') else None)} | {_f(r.get('cpu_latency_ms_b1'), 1)} |"
        lines.append(line)
    return lines


def render_markdown(summary: dict) -> str:
    """The README's Results tables, from summary.json alone."""
    lines = ["Pretraining, scored on the whole held-out split of the Wikipedia sample with the same masks "
             "for every model:", ""]
    lines += _pretrain_table(summary["pretraining"], with_speed=True)
    lines += ["", "*teacher*: the run whose export gave the copied layers and, where the loss has KL or cosine "
                  "terms, the targets."]
    lines += ["", "Fine-tuned on the offline tweet sentiment set; accuracy on its test split, mean ± sample "
              "std over every seed run:", "",
              "| model | test acc % (mean ± std) | per seed | validation acc % |", "|:---|---:|:---|---:|"]
    for r in summary["sentiment"]:
        t, v = r["test_accuracy_pct"], r["validation_accuracy_pct"]
        seeds = ", ".join(f"{_f(x)}" for x in t["per_seed"].values())
        lines.append(f"| {r['model']} | {_f(t['mean'])} ± {_f(t['std'])} (n={t['n']}) | {seeds} "
                     f"| {_f(v['mean'])} ± {_f(v['std'])} |")
    majority = summary.get("sentiment_majority_class_pct") or {}
    if "test" in majority:
        examples = ", ".join(str(n) for n in sorted({n for r in summary["sentiment"] for n in r["test_examples"]}))
        lines += ["", f"Test split: {examples} examples. Always answering the train split's most common label "
                      f"scores {_f(majority['test'])}% on it."]
    if summary.get("levers"):
        lines += ["", "Levers tried (pretraining only, same steps and data):", ""]
        lines += _pretrain_table(summary["levers"], with_speed=False)
    lines += ["", "Published reference numbers (papers, not measured here: SST-2 dev/test and SQuAD, "
              "full-scale pretraining):", "", "| model | params (M) | SST-2 acc % | SQuAD F1 % |",
              "|:---|---:|---:|---:|"]
    for r in summary["published"]:
        lines.append(f"| {r['model']} *(published)* | {_f(r['params_M'], 1)} | {_f(r.get('SST-2 acc %'), 1)} "
                     f"| {_f(r.get('SQuAD F1 %'), 1)} |")
    lines += ["", f"Compute: {summary['total_minutes']} min for the study's stages on {summary['nproc']} "
              f"processes" + (f", plus {summary['lever_minutes']} min for the levers" if summary.get("levers") else "")
              + f" (logs/{summary['name']}/stages.json)."]
    return "\n".join(lines) + "\n"


def plot_study(summary: dict, logs: Path, out_dir: Path) -> Path:
    """Held-out MLM loss over training and fine-tuned accuracy per seed, side by side."""
    names = [r["run"] for r in summary["pretraining"]]
    colors = run_colors(names)
    fig = _figure((12, 4.6))
    ax_mlm, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name in names:
        run = report.load_run(logs / name)
        x, y = run.series("train/mlm_ce")
        ax_mlm.plot(x, y, "-", color=colors[name], alpha=0.3, lw=1)
        x, y = run.series("eval/mlm_ce")
        ax_mlm.plot(x, y, "-o", color=colors[name], label=name, markersize=4)
    _style(ax_mlm, "MLM loss: held-out (points), train batches (faint)", "cross-entropy (nats)")
    ax_mlm.legend(frameon=False)
    rows = summary["sentiment"]
    for i, r in enumerate(rows):
        t = r["test_accuracy_pct"]
        color = colors.get(r["model"], "grey")
        ax_acc.bar(i, t["mean"], color=color, alpha=0.35, width=0.6)
        ax_acc.errorbar(i, t["mean"], yerr=t["std"] or 0, color=color, capsize=6, lw=1.5)
        ax_acc.plot([i] * len(t["per_seed"]), list(t["per_seed"].values()), "o", color=color, markersize=5)
    floor = (summary.get("sentiment_majority_class_pct") or {}).get("test")
    if floor is not None:
        ax_acc.axhline(floor, color="black", ls="--", lw=1)
        ax_acc.annotate(f"always the majority class: {floor:.1f}%", (-0.45, floor), ha="left", va="bottom",
                        fontsize=9, zorder=5)
    ax_acc.set_xticks(range(len(rows)), [r["model"] for r in rows])
    values = [v for r in rows for v in r["test_accuracy_pct"]["per_seed"].values()]
    if values:
        ax_acc.set_ylim(max(0.0, min(values) - 5), min(100.0, max(values) + 3))
    _style(ax_acc, "tweet sentiment, test accuracy (bar: mean ± std; dots: seeds)", "accuracy %", "model")
    return _save(fig, out_dir / "study.png")


def write_all(cfg, stages, minutes: dict, latency: bool = True) -> list[Path]:
    """compare_benchmarks' figures and tables for the study, then summary.json, results.md, study.png."""
    from kd.experiment import export_dir, log_dir, plots_dir

    logs, plots = log_dir(cfg), plots_dir(cfg)
    main_runs = [s.run for s in stages if s.kind == "pretrain"]
    if latency:  # the runs are over: time the models with every core, as a deployment would
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
    written = report.build_report(logs, plots, run_names=main_runs + [s.run for s in stages if s.kind == "lever"],
                                  models=[export_dir(cfg, r) for r in main_runs], latency=latency)
    summary = build_summary(cfg, stages, minutes, logs, plots)
    write_json(str(logs / "summary.json"), summary)
    (logs / "results.md").write_text(render_markdown(summary), encoding="utf-8")
    return written + [logs / "summary.json", logs / "results.md", plot_study(summary, logs, plots)]


README_BEGIN, README_END = "<!-- experiment-results:begin -->", "<!-- experiment-results:end -->"
PUBLISHED_FIGURES = ("study.png", "convergence_eval.png", "quality_vs_speed.png")


def publish(cfg, readme: Path, docs_dir: Path) -> list[Path]:
    """Copy this run's summary.json and figures into docs_dir and put its tables in the README
    between the two markers, so what the README says is exactly what the run wrote."""
    import shutil

    from kd.errors import KDError
    from kd.experiment import log_dir, plots_dir

    summary_path = log_dir(cfg) / "summary.json"
    if not summary_path.is_file():
        raise KDError(f"{summary_path} does not exist: run `make experiment` first")
    text = readme.read_text(encoding="utf-8")
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise KDError(f"{readme} needs exactly one {README_BEGIN} ... {README_END} block for the tables")
    docs_dir.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copy2(summary_path, docs_dir / "summary.json"))]
    copied += [Path(shutil.copy2(plots_dir(cfg) / f, docs_dir / f)) for f in PUBLISHED_FIGURES
               if (plots_dir(cfg) / f).is_file()]
    table = render_markdown(json.loads(summary_path.read_text()))
    head, rest = text.split(README_BEGIN)
    readme.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{rest.split(README_END, 1)[1]}", encoding="utf-8")
    return copied + [readme]

