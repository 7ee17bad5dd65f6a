"""The study's figures, from summary.json and the runs' metrics (plots/<name>/*.png)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from kd.plots.style import is_number, new_figure, run_colors, save_figure, style_axes
from kd.report.runs import load_run

CELLS = [("neither", "no KD"), ("pretrain_kd_only", "pretraining KD"), ("task_kd_only", "task KD"),
         ("both", "both stages"), ("teacher", "teacher")]


def _mean_curve(logs: Path, runs: List[str], key: str):
    """Mean over seeds of a metric at the steps every run logged it."""
    series = [dict(zip(*load_run(logs / r).series(key))) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    return np.array(steps), np.array([np.mean([s[x] for s in series]) for x in steps]), series


def plot_study(summary: dict, logs: Path, out_dir: Path) -> Path:
    """Left: held-out MLM loss through pretraining (mean of seeds, seeds faint). Right: the 2x2 of
    fine-tuned test accuracy with every seed, the teacher and the majority-class floor."""
    groups = [g for g in summary["pretraining_groups"] if not g["lever"]]
    colors = run_colors([g["group"] for g in groups])
    fig = new_figure((13, 4.8))
    ax_mlm, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for g in groups:
        x, y, series = _mean_curve(logs, g["runs"], "eval/mlm_ce")
        for s in series if len(series) > 1 else []:
            ax_mlm.plot(list(s), list(s.values()), "-", color=colors[g["group"]], alpha=0.25, lw=1)
        ax_mlm.plot(x, y, "-o", color=colors[g["group"]], markersize=3.5,
                    label=f"{g['group']} (mean of {len(g['runs'])})" if len(g["runs"]) > 1 else g["group"])
    style_axes(ax_mlm, "held-out MLM loss (mean of seeds; seeds faint)", "cross-entropy (nats)")
    ax_mlm.legend(frameon=False)
    cells = summary.get("two_by_two") or {}
    shown = [(key, label) for key, label in CELLS if key in cells]
    if not cells:  # no 2x2 in this study: one bar per fine-tune group
        cells = {g["group"]: g["test_accuracy_pct"] for g in summary.get("finetune_groups") or []}
        shown = [(name, name) for name in cells]
    for i, (key, label) in enumerate(shown):
        c = cells[key]
        color = "grey" if key == "teacher" else ("tab:green" if key == "both" else "tab:blue")
        ax_acc.bar(i, c["mean"], color=color, alpha=0.35, width=0.6)
        ax_acc.errorbar(i, c["mean"], yerr=c["std"] or 0, color=color, capsize=6, lw=1.5)
        ax_acc.plot([i] * len(c["per_seed"]), list(c["per_seed"].values()), "o", color=color, markersize=5)
    floor = (summary.get("majority_class_pct") or {}).get("test")
    values = [v for key, _ in shown for v in cells[key]["per_seed"].values()]
    if is_number(floor):
        ax_acc.axhline(floor, color="black", ls="--", lw=1)
        ax_acc.annotate(f"majority class: {floor:.1f}%", (-0.45, floor), ha="left", va="bottom", fontsize=9)
        values.append(floor)
    ax_acc.set_xticks(range(len(shown)), [label for _, label in shown])
    if values:
        ax_acc.set_ylim(max(0.0, min(values) - 2), min(100.0, max(values) + 1.5))
    style_axes(ax_acc, "tweet sentiment, test accuracy (bar: mean ± std; dots: seeds)", "accuracy %",
               "KD stages" if summary.get("two_by_two") else "fine-tune group")
    return save_figure(fig, out_dir / "study.png")


def plot_dose_response(summary: dict, out_dir: Path) -> Path:
    """KD gain (with the seeds' std) against how far the teacher leads the no-KD student."""
    levels = summary.get("dose_response") or []
    fig = new_figure((7, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    for d in levels:
        gain = d["kd_gain"]
        ax.errorbar(d["teacher_lead"], gain["mean"], yerr=gain["std"] or 0, fmt="o", color="tab:blue",
                    capsize=5, markersize=6)
        ax.plot([d["teacher_lead"]] * gain["n"], list(gain["per_seed"].values()), ".", color="tab:blue", alpha=0.5)
        ax.annotate(f"teacher {d['teacher']}\n({d['teacher_loss']:.2f} nats)", (d["teacher_lead"], gain["mean"]),
                    xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    style_axes(ax, "KD gain against the teacher's lead (error bar: std over seeds; dots: seeds)",
               "KD gain: no-KD loss − KD loss (nats)", "teacher's lead: no-KD loss − teacher loss (nats)")
    return save_figure(fig, out_dir / "dose_response.png")


def plot_equal_compute(summary: dict, out_dir: Path) -> Path:
    """Held-out loss against training FLOPs (left) and measured seconds (right); a cache's curve
    starts at its one-off generation cost."""
    from kd.study.render import EQUAL_COMPUTE_NAMES
    runs = (summary.get("equal_compute") or {}).get("runs", {})
    fig = new_figure((13, 4.8))
    axes = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = run_colors(list(runs))
    for role, r in runs.items():
        steps = np.array([p[0] for p in r["curve"]], dtype=float)
        loss = [p[1] for p in r["curve"]]
        for ax, per_step, setup, scale in ((axes[0], r["flops_per_step"], r["setup_flops"], 1e15),
                                           (axes[1], r["seconds_per_step"], r["setup_seconds"], 60.0)):
            x = (setup + steps * per_step) / scale
            ax.plot(x, loss, "-o", color=colors[role], markersize=3.5, label=EQUAL_COMPUTE_NAMES.get(role, role))
            if setup:
                ax.axvline(setup / scale, color=colors[role], ls=":", lw=1)
    style_axes(axes[0], "held-out MLM loss against training compute", "cross-entropy (nats)", "PFLOP (matmul, counted)")
    style_axes(axes[1], "held-out MLM loss against time (dotted: cache generation)", "cross-entropy (nats)",
               "minutes of training (measured step time x steps)")
    axes[0].legend(frameon=False)
    return save_figure(fig, out_dir / "equal_compute.png")


def plot_finetune_curves(summary: dict, out_dir: Path) -> Path:
    """Mean validation accuracy through fine-tuning per group: where it flattens."""
    groups = summary.get("finetune_groups") or []
    colors = run_colors([g["group"] for g in groups])
    fig = new_figure((8, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    for g in groups:
        curve = g["validation_curve"]
        ax.plot([int(s) for s in curve], list(curve.values()), "-o", color=colors[g["group"]], markersize=3.5,
                label=f"{g['group']} (n={g['test_accuracy_pct']['n']})")
    style_axes(ax, "fine-tuning: validation accuracy (mean of seeds)", "accuracy %")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, out_dir / "finetune_curves.png")


def write_figures(summary: dict, logs: Path, out_dir: Path) -> List[Path]:
    written = [plot_study(summary, logs, out_dir), plot_finetune_curves(summary, out_dir)]
    if summary.get("dose_response"):
        written.append(plot_dose_response(summary, out_dir))
    if (summary.get("equal_compute") or {}).get("runs"):
        written.append(plot_equal_compute(summary, out_dir))
    return written
