"""Fine-tuning curves: per task, train/validation loss and the task metric per epoch, one line per run.

Colour says which run and line style says which curve, so each figure carries two short legends
rather than one entry per line.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from kd.plots.style import (METRIC_NAMES, TASK_NAMES, auto_log_y, new_figure, run_colors, run_legend,
                            save_figure, style_axes)

log = logging.getLogger(__name__)


def _per_epoch(run, key):
    """One point per epoch: fine-tuning logs one record per epoch, but if train records come per
    step the epoch's mean is the train loss people quote; for eval keys the last record counts."""
    x, y = run.series(key, x="epoch")
    if len(np.unique(x)) == len(x):
        return x, y
    grouped = pd.Series(y).groupby(x)
    y = grouped.mean() if key.startswith("train/") else grouped.last()
    return y.index.to_numpy(dtype=float), y.to_numpy()


def _epoch_ticks(ax, epochs) -> None:
    # Whole epochs only; a one-epoch run would otherwise get ticks at -0.045 ... 0.045.
    if 0 < len(epochs) <= 12:
        ax.set_xticks(sorted(epochs))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _style_legend(ax, styles: dict) -> None:
    handles = [Line2D([], [], linestyle=st.rstrip("os"), marker=st[-1], color="0.1") for st in styles.values()]
    ax.legend(handles, list(styles), fontsize="small")


def plot_finetune(runs, out_dir, colors=None) -> list[Path]:
    """Per task: train/validation loss and the task metric per epoch, one line per run."""
    runs = [r for r in runs if r.kind == "finetune"]
    if not runs:
        log.info("no fine-tuning runs: fine-tuning curves skipped")
        return []
    colors = colors or run_colors([r.name for r in runs])
    written = []
    for task in sorted({r.task for r in runs}):
        group = [r for r in runs if r.task == task]
        for run in group:
            if not run.has_eval:
                log.warning(f"run {run.name}: no eval records yet; only its train loss is plotted")
        fig = new_figure((11, 4.8))
        ax_loss, ax_metric = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        drawn, metrics_seen, epochs = [], {}, set()
        for run in group:
            for key, style in (("train/loss", "-o"), ("eval/loss", "--s")):
                x, y = _per_epoch(run, key)
                if len(x):
                    ax_loss.plot(x, y, style, color=colors[run.name], markersize=4)
                    drawn.append(y)
                    epochs.update(x)
            for metric, style in (("accuracy", "-o"), ("f1", "-o"), ("exact_match", ":s")):
                x, y = _per_epoch(run, f"eval/{metric}")
                if len(x):
                    ax_metric.plot(x, y, style, color=colors[run.name], markersize=4)
                    metrics_seen[{"accuracy": "accuracy"}.get(metric, METRIC_NAMES[metric])] = style
        name = TASK_NAMES.get(task, task)
        style_axes(ax_loss, f"{name}: loss per epoch", "loss", "epoch")
        style_axes(ax_metric, f"{name}: validation {' / '.join(metrics_seen) or 'metric'}",
               f"{' / '.join(metrics_seen) or 'metric'} (%)", "epoch")
        auto_log_y(ax_loss, drawn)
        # Colour says which run, line style says which curve: two short legends, not one per line.
        _style_legend(ax_loss, {"train": "-o", "validation": "--s"})
        if len(metrics_seen) > 1:
            _style_legend(ax_metric, metrics_seen)
        for ax in (ax_loss, ax_metric):
            _epoch_ticks(ax, epochs)
        run_legend(fig, group, colors)
        written.append(save_figure(fig, Path(out_dir) / f"finetune_{task}.png"))
    return written
