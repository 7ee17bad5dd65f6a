"""The look every figure shares, so a run has one colour and a number one spelling everywhere.

Figure and file helpers (`new_figure`, `save_figure`), axis and legend styling, the automatic log
scale, run colours, display names of tasks and metrics, and the number checks and formatting the
report's tables use too. Used by every kd/plots module and by kd/study/figures.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

FIGSIZE = (8, 5)
DPI = 120
LOG_SCALE_DECADES = 1.5  # a loss falling further than this is unreadable on a linear axis

TASK_NAMES = {"sst2": "SST-2", "squad": "SQuAD"}
METRIC_NAMES = {"accuracy": "acc", "exact_match": "EM", "f1": "F1"}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_number(v, integral=False) -> str:
    """Readable precision from 30522-token perplexities down to 1e-5 learning rates."""
    if integral or abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return "0" if v == 0 else f"{v:.3g}"


def run_colors(names) -> dict:
    """One colour per name, fixed by order, so a run looks the same in every figure."""
    palette = matplotlib.colormaps["tab10"].colors
    if len(set(names)) > 10:  # tab20 pairs dark/light shades: use all dark ones before any light one
        tab20 = matplotlib.colormaps["tab20"].colors
        palette = tab20[0::2] + tab20[1::2]
    return {name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys(names))}


def new_figure(figsize=FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no display, and a renderer for measuring labels
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def auto_log_y(ax, arrays) -> None:
    vals = np.concatenate([np.asarray(a, dtype=float) for a in arrays]) if arrays else np.array([])
    vals = vals[np.isfinite(vals)]
    if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 10 ** LOG_SCALE_DECADES:
        ax.set_yscale("log")


def style_axes(ax, title, ylabel, xlabel="optimizer step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def run_legend(fig, runs, colors) -> None:
    """One figure-wide legend of run colours, below the panels."""
    handles = [Line2D([], [], color=colors[r.name], linewidth=2) for r in runs]
    fig.legend(handles, [r.name for r in runs], loc="outside lower center", ncols=min(len(runs), 4))
