"""Model-comparison figures from the benchmark table, and the training-throughput bench chart.

`plot_benchmarks` draws bars of size, latency, throughput and accuracy, then accuracy against
speed and size; published numbers are hatched or hollow so they never pass for measured ones.
`plot_bench_throughput` draws the tokens/s per variant that bench/distill_throughput.py wrote.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from matplotlib.transforms import Bbox

from kd.plots.style import FIGSIZE, fmt_number, is_number, new_figure, run_colors, save_figure, style_axes

log = logging.getLogger(__name__)


# Where a point's label may go, tried in order: (dx, dy) in points, horizontal and vertical anchor.
_LABEL_SPOTS = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
                (-6, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top")]


def _place_labels(fig: Figure, annotations) -> None:
    """Move each point label to the first spot beside its point that stays inside the axes and
    clears every marker and label placed so far (published 91.3 vs 91.5 would collide)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    r = 6  # marker half-size in pixels
    placed = [Bbox.from_extents(x - r, y - r, x + r, y + r)
              for x, y in (a.axes.transData.transform(a.xy) for a in annotations)]
    for ann in annotations:
        frame = ann.axes.get_window_extent(renderer)
        for dx, dy, ha, va in _LABEL_SPOTS:
            ann.xyann = (dx, dy)
            ann.set(ha=ha, va=va)
            box = ann.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in placed):
                break
        else:  # crowded everywhere: the first spot is the least surprising
            ann.xyann = _LABEL_SPOTS[0][:2]
            ann.set(ha=_LABEL_SPOTS[0][2], va=_LABEL_SPOTS[0][3])
        placed.append(ann.get_window_extent(renderer))


def _barh(ax, labels, values, colors, hollow, title, xlabel) -> None:
    y = np.arange(len(labels))
    for yi, v, c, h in zip(y, values, colors, hollow):
        ax.barh(yi, v, color="none" if h else c, edgecolor=c, hatch="//" if h else None, linewidth=1.2)
        ax.annotate(fmt_number(v), (v, yi), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize="small")
    ax.set_yticks(y, labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    ax.margins(x=0.18)


def _accuracy_points(table: pd.DataFrame) -> list[tuple]:
    """(label, accuracy, column, is_published, row) for every accuracy cell of the table."""
    points = []
    for col in [c for c in table.columns if c.endswith(" acc %")]:
        task = col.removesuffix(" acc %")
        for _, row in table.dropna(subset=[col]).iterrows():
            published = row["source"] == "published"
            label = f"{row['model']}{' (published)' if published else ''} · {task}"
            points.append((label, row[col], col, published, row))
    return points


def plot_benchmarks(table: pd.DataFrame, out_dir, colors=None) -> list[Path]:
    """Bars of params, latency, throughput and accuracy; accuracy against throughput and size."""
    out_dir = Path(out_dir)
    if table.empty or (table["source"] == "measured").sum() == 0:
        log.info("no measured models: benchmark figures skipped")
        return []
    colors = {**run_colors(list(table["model"])), **(colors or {})}

    def color_of(row):
        return (0.35, 0.35, 0.35) if row["source"] == "published" else colors[row["model"]]

    def rows_with(col):
        return [r for _, r in table.dropna(subset=[col]).iterrows()] if col in table else []

    panels = [("params_M", "Parameters", "parameters (millions)"),
              ("latency_ms_b1", "Latency, batch 1", "ms per sequence (lower is better)"),
              ("throughput_seq_s_b32", "Throughput, batch 32", "sequences / s (higher is better)")]
    panels = [p for p in panels if rows_with(p[0])]
    acc = _accuracy_points(table)
    n = len(panels) + bool(acc)
    fig = new_figure((12, 8) if n == 4 else (6 * n, 4.5))
    for i, (col, title, xlabel) in enumerate(panels):
        rows = rows_with(col)
        published = [r["source"] == "published" for r in rows]
        _barh(fig.add_subplot(2 if n == 4 else 1, 2 if n == 4 else n, i + 1),
              [f"{r['model']}{' (published)' if p else ''}" for r, p in zip(rows, published)],
              [r[col] for r in rows], [color_of(r) for r in rows], published, title, xlabel)
    if acc:
        ax = fig.add_subplot(2 if n == 4 else 1, 2 if n == 4 else n, n)
        _barh(ax, [p[0] for p in acc], [p[1] for p in acc], [color_of(p[4]) for p in acc],
              [p[3] for p in acc], "Accuracy (task named per bar)", "accuracy (%)")
        low = max(0.0, 5 * math.floor((min(p[1] for p in acc) - 10) / 5))
        ax.set_xlim(low, 100 + (100 - low) * 0.12)  # room for the value labels right of the bars
        ax.set_xticks([t for t in ax.get_xticks() if low <= t <= 100])
    fig.suptitle("Model comparison (hatched = published numbers, not measured here)")
    written = [save_figure(fig, out_dir / "benchmarks_bars.png")]
    scatter = _plot_quality_scatter(acc, color_of, out_dir)
    return written + ([scatter] if scatter else [])


def _plot_quality_scatter(acc, color_of, out_dir):
    if not acc:
        log.info("no accuracy results: quality_vs_speed.png not made")
        return None
    timed = [p for p in acc if not p[3] and is_number(p[4].get("throughput_seq_s_b32"))]
    fig = new_figure((12, 5) if timed else FIGSIZE)
    ax_speed = fig.add_subplot(1, 2, 1) if timed else None
    ax_size = fig.add_subplot(1, 2, 2) if timed else fig.add_subplot()
    markers = {col: "os^v<>p"[i % 7] for i, col in enumerate(dict.fromkeys(p[2] for p in acc))}
    labels = []
    for label, y, col, published, row in acc:
        if published:
            style = dict(marker="D", facecolors="none", edgecolors=color_of(row))
        else:
            style = dict(marker=markers[col], color=color_of(row))
        for ax, x in ((ax_size, row["params_M"]), (ax_speed, row.get("throughput_seq_s_b32"))):
            if ax is not None and is_number(x) and not (published and ax is ax_speed):
                ax.scatter([x], [y], s=70, linewidths=1.5, **style)
                labels.append(ax.annotate(label, (x, y), xytext=(6, 4), textcoords="offset points",
                                          fontsize="small"))
    if ax_speed is not None:
        style_axes(ax_speed, "Accuracy vs speed (measured here)", "accuracy (%)",
               "throughput, batch 32 (sequences / s)")
        ax_speed.margins(x=0.4, y=0.25)
    style_axes(ax_size, "Accuracy vs size (hollow = published)", "accuracy (%)", "parameters (millions, log)")
    ax_size.set_xscale("log")
    ax_size.margins(x=0.4, y=0.2)
    fig.suptitle("Quality versus cost (each label names the task its accuracy is on)")
    _place_labels(fig, labels)
    return save_figure(fig, out_dir / "quality_vs_speed.png")


def plot_bench_throughput(benches, out_dir) -> list[Path]:
    """Grouped bars of training tokens/s per variant; `benches` is [(name, bench json dict)]."""
    if not benches:
        return []
    variants = list(dict.fromkeys(v for _, b in benches for v in b["variants"]))
    colors = run_colors(variants)
    fig = new_figure()
    ax = fig.add_subplot()
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for g, (_, bench) in enumerate(benches):
            numbers = bench["variants"].get(variant)
            value = numbers.get("tokens_per_s") if isinstance(numbers, dict) else None
            if is_number(value):
                xs.append(g + (i - (len(variants) - 1) / 2) * width)
                ys.append(value)
        bars = ax.bar(xs, ys, width, label=variant, color=colors[variant])
        ax.bar_label(bars, labels=[EngFormatter(places=1)(v) for v in ys], fontsize="small")
    ticks = [f"{b.get('preset', name)}\n{b.get('device', '')}" +
             (f"\nratio {b['ratio']:.2f}x" if is_number(b.get("ratio")) else "") for name, b in benches]
    ax.set_xticks(range(len(benches)), ticks, fontsize="small")
    ax.yaxis.set_major_formatter(EngFormatter())
    style_axes(ax, "Training throughput per variant", "tokens / s", "")
    ax.margins(y=0.15)
    ax.legend()
    return [save_figure(fig, Path(out_dir) / "bench_throughput.png")]
