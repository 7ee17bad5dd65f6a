"""Convergence plots, fine-tuning curves and benchmark tables from `logs/` (DESIGN §1, step 3).

Inputs are what the training code writes: logs/<run>/run.json, metrics.jsonl, results.json, and
optionally logs/bench/*.json. Missing pieces are expected (a run still going, a model never
fine-tuned): each is reported in one log line and everything that can still be made is made.

`build_report`, the one call compare_benchmarks.py makes, lives here at the package's front
door; `plot_throughput_bench` adds the bench chart. The pieces it puts together:
- runs.py        runs and fine-tune results read back from logs/
- benchmarks.py  the model-comparison table: which model folders, their size, timed speed and
                 quality, published numbers apart
- tables.py      the runs and benchmark tables written as markdown and CSV
- kd/plots/      the figures
"""
from __future__ import annotations

import logging
from pathlib import Path

from kd.plots.benchmarks import plot_bench_throughput, plot_benchmarks
from kd.plots.convergence import plot_convergence
from kd.plots.finetune_curves import plot_finetune
from kd.plots.style import run_colors
from kd.report.benchmarks import benchmark_table, default_models, export_labels, short_label
from kd.report.runs import find_runs, load_results, model_key, read_json
from kd.report.tables import write_benchmarks, write_runs

log = logging.getLogger(__name__)


def build_report(logs_dir="logs", plots_dir="plots", run_names=None, models=None, device="auto",
                 latency=True, repeats=10, seq_len=128) -> list[Path]:
    """Everything compare_benchmarks.py makes; returns the files written."""
    logs_dir, plots_dir = Path(logs_dir), Path(plots_dir)
    runs = find_runs(logs_dir, run_names)
    if not runs:
        log.warning(f"no runs found: no folder under {logs_dir}/ holds a metrics.jsonl")
    results = load_results(logs_dir)
    if models is None:
        models, labels = default_models(logs_dir, results)
    else:
        labels = {}
    labels = {**labels, **export_labels(logs_dir)}
    colors = run_colors([r.name for r in runs] + [labels.get(model_key(m), short_label(Path(m))) for m in models])
    written = plot_convergence(runs, plots_dir, colors) + plot_finetune(runs, plots_dir, colors)
    if runs:
        written += write_runs(runs, plots_dir)
    if models:
        table = benchmark_table(models, results, device=device, latency=latency, repeats=repeats,
                                seq_len=seq_len, labels=labels)
        written += write_benchmarks(table, plots_dir) + plot_benchmarks(table, plots_dir, colors)
    else:
        log.warning("no models to benchmark: pass --models, or export a pretraining run first")
    return written + plot_throughput_bench(logs_dir, plots_dir)


def plot_throughput_bench(logs_dir, out_dir) -> list[Path]:
    """The training-throughput chart from logs/bench/*.json (written by the bench script), if any."""
    files = sorted((Path(logs_dir) / "bench").glob("*.json"))
    benches = [(f.stem, b) for f in files if (b := read_json(f)) and isinstance(b.get("variants"), dict)]
    if not benches:
        log.info(f"no {Path(logs_dir) / 'bench'}/*.json: throughput benchmark chart skipped")
    return plot_bench_throughput(benches, out_dir)
