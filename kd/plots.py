"""Figures for the report: convergence, fine-tuning curves, model comparison, throughput bench.

Built on `matplotlib.figure.Figure` with an Agg canvas, so nothing here touches pyplot's global
state or needs a display. Data comes in already loaded (see kd/report.py); runs are any objects
with `name`, `kind`, `task`, `has(key)`, `has_eval`, `loss_terms` and `series(key, x)`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator
from matplotlib.transforms import Bbox

log = logging.getLogger(__name__)

FIGSIZE = (8, 5)
DPI = 120
LOG_SCALE_DECADES = 1.5  # a loss falling further than this is unreadable on a linear axis
SMOOTH_ABOVE = 200  # points per curve; beyond this a raw train curve is mostly noise

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


def _figure(figsize=FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no display, and a renderer for measuring labels
    return fig


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


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _auto_log_y(ax, arrays) -> None:
    vals = np.concatenate([np.asarray(a, dtype=float) for a in arrays]) if arrays else np.array([])
    vals = vals[np.isfinite(vals)]
    if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 10 ** LOG_SCALE_DECADES:
        ax.set_yscale("log")


def _ema(y: np.ndarray, span: int) -> np.ndarray:
    return pd.Series(y).ewm(span=span).mean().to_numpy()


def _plot_curve(ax, x, y, color, label, eval_points=False) -> None:
    if eval_points:
        ax.plot(x, y, "--o", color=color, label=label, markersize=3.5, linewidth=1.2)
    elif len(x) > SMOOTH_ABOVE:
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, _ema(y, len(x) // 50), color=color, label=f"{label} (smoothed)", linewidth=1.4)
    else:  # a marker keeps a run with a single record visible
        ax.plot(x, y, color=color, label=label, linewidth=1.4, marker="o" if len(x) == 1 else None)


def _interp_extrapolate(x, xp, fp):
    x = np.asarray(x, dtype=float)
    left = fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    right = fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return np.where(x < xp[0], left, np.where(x > xp[-1], right, np.interp(x, xp, fp)))


def step_to_tokens(runs):
    """(steps->tokens, tokens->steps, axis label) from the longest run's records, or None.

    A constant batch makes the mapping linear and exact; a run resumed with another batch size is
    mapped piecewise. Runs with other tokens per step get a different top axis, so the label says
    which run it belongs to.
    """
    fits = []
    for run in runs:
        steps, tokens = run.series("tokens_seen")
        steps, idx = np.unique(steps, return_index=True)
        tokens = tokens[idx]
        if len(steps) == 1 and steps[0] > 0:
            steps, tokens = np.array([0.0, steps[0]]), np.array([0.0, tokens[0]])
        if len(steps) >= 2 and np.all(np.diff(tokens) > 0):
            fits.append((steps[-1], run.name, steps, tokens))
    if not fits:
        return None
    _, ref_name, steps, tokens = max(fits, key=lambda f: f[0])
    slope, offset = np.polyfit(steps, tokens, 1)
    if np.max(np.abs(slope * steps + offset - tokens)) <= 0.01 * (tokens[-1] - tokens[0]):
        fwd, inv = (lambda s: slope * np.asarray(s) + offset), (lambda t: (np.asarray(t) - offset) / slope)
    else:
        fwd, inv = (lambda s: _interp_extrapolate(s, steps, tokens)), (lambda t: _interp_extrapolate(t, tokens, steps))
    rates = {round(float(t[-1] - t[0]) / float(s[-1] - s[0]), 3) for _, _, s, t in fits}
    label = "tokens seen" if len(rates) == 1 else f"tokens seen ({ref_name})"
    return fwd, inv, label


def _tokens_axis(ax, mapping, label=True) -> None:
    if mapping is None:
        return
    fwd, inv, text = mapping
    top = ax.secondary_xaxis("top", functions=(fwd, inv))
    top.xaxis.set_major_formatter(EngFormatter())
    top.tick_params(labelsize="small")
    if label:
        top.set_xlabel(text)


def _style(ax, title, ylabel, xlabel="optimizer step") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _run_legend(fig, runs, colors) -> None:
    handles = [Line2D([], [], color=colors[r.name], linewidth=2) for r in runs]
    fig.legend(handles, [r.name for r in runs], loc="outside lower center", ncols=min(len(runs), 4))


def _style_legend(ax, styles: dict) -> None:
    handles = [Line2D([], [], linestyle=st.rstrip("os"), marker=st[-1], color="0.1") for st in styles.values()]
    ax.legend(handles, list(styles), fontsize="small")


# ------------------------------------------------------------------------------ convergence plots

def plot_convergence(runs, out_dir, colors=None) -> list[Path]:
    """Pretraining curves: total loss, each unweighted term, perplexity / masked accuracy, LR."""
    runs = [r for r in runs if r.kind == "pretrain"]
    if not runs:
        log.info("no pretraining runs: convergence plots skipped")
        return []
    colors = colors or run_colors([r.name for r in runs])
    out_dir = Path(out_dir)
    for run in runs:
        if not run.has("train/loss"):
            log.warning(f"run {run.name}: no train records yet")
        if not run.has_eval:
            log.warning(f"run {run.name}: no eval records yet; its validation loss, perplexity and "
                        f"masked accuracy are not plotted")
    mapping = step_to_tokens(runs)
    made = [_plot_total_loss(runs, out_dir, colors, mapping), _plot_terms(runs, out_dir, colors, mapping),
            _plot_eval(runs, out_dir, colors, mapping), _plot_lr(runs, out_dir, colors, mapping)]
    return [p for p in made if p]


def _plot_total_loss(runs, out_dir, colors, mapping):
    fig = _figure()
    ax = fig.add_subplot()
    drawn = []
    for run in runs:
        for key, label, is_eval in (("train/loss", "train", False), ("eval/loss", "validation", True)):
            x, y = run.series(key)
            if len(x):
                _plot_curve(ax, x, y, colors[run.name], f"{run.name} {label}", eval_points=is_eval)
                drawn.append(y)
    if not drawn:
        log.warning("no run has train/loss or eval/loss records: convergence_loss.png not made")
        return None
    _style(ax, "Total loss (weighted sum of terms): train vs validation", "loss")
    _auto_log_y(ax, drawn)
    _tokens_axis(ax, mapping)
    ax.legend(fontsize="small")
    return _save(fig, out_dir / "convergence_loss.png")


def _plot_terms(runs, out_dir, colors, mapping):
    # MLM first, then logit KD, then the rest: the order a reader checks them in.
    terms = sorted({t for r in runs for t in r.loss_terms},
                   key=lambda t: ("mlm" not in t, "kd" not in t, t))
    if not terms:
        log.warning("no loss-term records (train/<term>) in any run: convergence_terms.png not made")
        return None
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = _figure((max(8, 3.7 * ncols), 3.0 * nrows + 1.2))
    for i, term in enumerate(terms):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        drawn = []
        for run in runs:
            x, y = run.series(term)
            if len(x):
                _plot_curve(ax, x, y, colors[run.name], run.name)
                drawn.append(y)
        _style(ax, term.removeprefix("train/"), "loss (unweighted)" if i % ncols == 0 else "",
               "optimizer step" if i >= len(terms) - ncols else "")
        _auto_log_y(ax, drawn)
        _tokens_axis(ax, mapping, label=i < ncols)
    fig.suptitle("Loss terms, unweighted (train)")
    _run_legend(fig, runs, colors)
    return _save(fig, out_dir / "convergence_terms.png")


def _plot_eval(runs, out_dir, colors, mapping):
    panels = [("eval/perplexity", "Perplexity", "perplexity"),
              ("eval/masked_accuracy", "Masked-token accuracy", "accuracy (%)"),
              ("eval/teacher_agreement", "Top-1 agreement with teacher", "agreement (%)")]
    panels = [p for p in panels if any(r.has(p[0]) for r in runs)]
    if not panels:
        log.warning("no perplexity or masked-accuracy records in any run yet: convergence_eval.png not made")
        return None
    fig = _figure((max(8, 3.9 * len(panels)), 4.6))
    for i, (key, title, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        drawn = []
        for run in runs:
            x, y = run.series(key)
            if len(x):
                ax.plot(x, y, "-o", color=colors[run.name], markersize=3.5)
                drawn.append(y)
        _style(ax, f"{title} (validation)", ylabel)
        _auto_log_y(ax, drawn)
        _tokens_axis(ax, mapping)
    _run_legend(fig, [r for r in runs if r.has_eval], colors)
    return _save(fig, out_dir / "convergence_eval.png")


def _plot_lr(runs, out_dir, colors, mapping):
    fig = _figure()
    ax = fig.add_subplot()
    drawn = False
    for i, run in enumerate(runs):
        x, y = run.series("lr")
        if len(x):  # runs often share a schedule exactly: vary the dash so none hides another
            ax.plot(x, y, ("-", "--", ":", "-.")[i % 4], color=colors[run.name], label=run.name, linewidth=1.6)
            drawn = True
    if not drawn:
        log.warning("no 'lr' records in any run: convergence_lr.png not made")
        return None
    _style(ax, "Learning rate schedule", "learning rate")
    # Plain tick labels: matplotlib's "1e-4" offset text would sit under the tokens axis.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}"))
    _tokens_axis(ax, mapping)
    ax.legend(fontsize="small")
    return _save(fig, out_dir / "convergence_lr.png")


# ----------------------------------------------------------------------------- fine-tuning curves

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
        fig = _figure((11, 4.8))
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
        _style(ax_loss, f"{name}: loss per epoch", "loss", "epoch")
        _style(ax_metric, f"{name}: validation {' / '.join(metrics_seen) or 'metric'}",
               f"{' / '.join(metrics_seen) or 'metric'} (%)", "epoch")
        _auto_log_y(ax_loss, drawn)
        # Colour says which run, line style says which curve: two short legends, not one per line.
        _style_legend(ax_loss, {"train": "-o", "validation": "--s"})
        if len(metrics_seen) > 1:
            _style_legend(ax_metric, metrics_seen)
        for ax in (ax_loss, ax_metric):
            _epoch_ticks(ax, epochs)
        _run_legend(fig, group, colors)
        written.append(_save(fig, Path(out_dir) / f"finetune_{task}.png"))
    return written


# ------------------------------------------------------------------------------ benchmark figures

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
    fig = _figure((12, 8) if n == 4 else (6 * n, 4.5))
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
    written = [_save(fig, out_dir / "benchmarks_bars.png")]
    scatter = _plot_quality_scatter(acc, color_of, out_dir)
    return written + ([scatter] if scatter else [])


def _plot_quality_scatter(acc, color_of, out_dir):
    if not acc:
        log.info("no accuracy results: quality_vs_speed.png not made")
        return None
    timed = [p for p in acc if not p[3] and is_number(p[4].get("throughput_seq_s_b32"))]
    fig = _figure((12, 5) if timed else FIGSIZE)
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
        _style(ax_speed, "Accuracy vs speed (measured here)", "accuracy (%)",
               "throughput, batch 32 (sequences / s)")
        ax_speed.margins(x=0.4, y=0.25)
    _style(ax_size, "Accuracy vs size (hollow = published)", "accuracy (%)", "parameters (millions, log)")
    ax_size.set_xscale("log")
    ax_size.margins(x=0.4, y=0.2)
    fig.suptitle("Quality versus cost (each label names the task its accuracy is on)")
    _place_labels(fig, labels)
    return _save(fig, out_dir / "quality_vs_speed.png")


def plot_bench_throughput(benches, out_dir) -> list[Path]:
    """Grouped bars of training tokens/s per variant; `benches` is [(name, bench json dict)]."""
    if not benches:
        return []
    variants = list(dict.fromkeys(v for _, b in benches for v in b["variants"]))
    colors = run_colors(variants)
    fig = _figure()
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
    _style(ax, "Training throughput per variant", "tokens / s", "")
    ax.margins(y=0.15)
    ax.legend()
    return [_save(fig, Path(out_dir) / "bench_throughput.png")]
