"""Pretraining convergence figures: total loss, each unweighted loss term, validation metrics, LR.

Each figure plots step on the x axis with tokens seen on a second axis at the top
(`step_to_tokens`), so runs with different batch sizes can be compared by data seen. Long raw
train curves are drawn faint with a smoothed line over them.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import EngFormatter, FuncFormatter

from kd.plots.style import auto_log_y, new_figure, run_colors, run_legend, save_figure, style_axes

log = logging.getLogger(__name__)

SMOOTH_ABOVE = 200  # points per curve; beyond this a raw train curve is mostly noise


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
    fig = new_figure()
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
    style_axes(ax, "Total loss (weighted sum of terms): train vs validation", "loss")
    auto_log_y(ax, drawn)
    _tokens_axis(ax, mapping)
    ax.legend(fontsize="small")
    return save_figure(fig, out_dir / "convergence_loss.png")


def _plot_terms(runs, out_dir, colors, mapping):
    # MLM first, then logit KD, then the rest: the order a reader checks them in.
    terms = sorted({t for r in runs for t in r.loss_terms},
                   key=lambda t: ("mlm" not in t, "kd" not in t, t))
    if not terms:
        log.warning("no loss-term records (train/<term>) in any run: convergence_terms.png not made")
        return None
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig = new_figure((max(8, 3.7 * ncols), 3.0 * nrows + 1.2))
    for i, term in enumerate(terms):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        drawn = []
        for run in runs:
            x, y = run.series(term)
            if len(x):
                _plot_curve(ax, x, y, colors[run.name], run.name)
                drawn.append(y)
        style_axes(ax, term.removeprefix("train/"), "loss (unweighted)" if i % ncols == 0 else "",
               "optimizer step" if i >= len(terms) - ncols else "")
        auto_log_y(ax, drawn)
        _tokens_axis(ax, mapping, label=i < ncols)
    fig.suptitle("Loss terms, unweighted (train)")
    run_legend(fig, runs, colors)
    return save_figure(fig, out_dir / "convergence_terms.png")


def _plot_eval(runs, out_dir, colors, mapping):
    panels = [("eval/perplexity", "Perplexity", "perplexity"),
              ("eval/masked_accuracy", "Masked-token accuracy", "accuracy (%)"),
              ("eval/teacher_agreement", "Top-1 agreement with teacher", "agreement (%)")]
    panels = [p for p in panels if any(r.has(p[0]) for r in runs)]
    if not panels:
        log.warning("no perplexity or masked-accuracy records in any run yet: convergence_eval.png not made")
        return None
    fig = new_figure((max(8, 3.9 * len(panels)), 4.6))
    for i, (key, title, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        drawn = []
        for run in runs:
            x, y = run.series(key)
            if len(x):
                ax.plot(x, y, "-o", color=colors[run.name], markersize=3.5)
                drawn.append(y)
        style_axes(ax, f"{title} (validation)", ylabel)
        auto_log_y(ax, drawn)
        _tokens_axis(ax, mapping)
    run_legend(fig, [r for r in runs if r.has_eval], colors)
    return save_figure(fig, out_dir / "convergence_eval.png")


def _plot_lr(runs, out_dir, colors, mapping):
    fig = new_figure()
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
    style_axes(ax, "Learning rate schedule", "learning rate")
    # Plain tick labels: matplotlib's "1e-4" offset text would sit under the tokens axis.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}"))
    _tokens_axis(ax, mapping)
    ax.legend(fontsize="small")
    return save_figure(fig, out_dir / "convergence_lr.png")
