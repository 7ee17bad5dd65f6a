"""After the runs: figures and tables (compare_benchmarks'), summary.json, results.md; and --publish,
which copies them into docs/<name>/ and the README, so the README says exactly what the run wrote."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List

from kd import report
from kd.errors import KDError
from kd.logger import write_json
from kd.study.compute import equal_compute
from kd.study.figures import write_figures
from kd.study.plan import Stage, export_dir, log_dir, plots_dir, run_root
from kd.study.render import render_markdown
from kd.study.summary import build_summary



def readme_markers(name: str) -> tuple:
    """Each study has its own block in the README: <!-- NAME-results:begin --> ... end."""
    return f"<!-- {name}-results:begin -->", f"<!-- {name}-results:end -->"

PUBLISHED_FIGURES = ("study.png", "finetune_curves.png", "dose_response.png", "equal_compute.png",
                     "convergence_eval.png", "quality_vs_speed.png")


def write_all(cfg, stages: List[Stage], minutes: dict, latency: bool = True, timing: bool = True,
              config_path: str = "configs/experiment.yaml") -> List[Path]:
    """compare_benchmarks' figures and tables for the study, the equal-compute timing, then
    summary.json, results.md and the study's figures."""
    import torch

    logs, plots = log_dir(cfg), plots_dir(cfg)
    pretrain_runs = [s.run for s in stages if s.kind == "pretrain" and (logs / s.run / "run.json").is_file()]
    headline = [s.run for s in stages if s.kind == "pretrain" and not s.lever]
    torch.set_num_threads(os.cpu_count() or 1)  # the runs are over: time with every core, as a deployment would
    written = report.build_report(logs, plots, run_names=pretrain_runs,
                                  models=[export_dir(cfg, r) for r in headline if export_dir(cfg, r).is_dir()],
                                  latency=latency)
    ec = cfg.equal_compute
    names = {"nokd": ec.nokd, "kd_masked": ec.kd_masked, "kd_all_positions": ec.kd_all_positions,
             "kd_cache": ec.kd_cache}
    compute = equal_compute(names, logs, run_root(cfg)) if timing else {}
    summary = build_summary(cfg, stages, minutes, logs, plots, compute, config_path)
    write_json(str(logs / "summary.json"), summary)
    (logs / "results.md").write_text(render_markdown(summary), encoding="utf-8")
    return written + [logs / "summary.json", logs / "results.md"] + write_figures(summary, logs, plots)


def publish(cfg, readme: Path, docs_dir: Path) -> List[Path]:
    """Copy this run's summary.json and figures into docs_dir and put its tables in the README
    between the two markers."""
    summary_path = log_dir(cfg) / "summary.json"
    if not summary_path.is_file():
        raise KDError(f"{summary_path} does not exist: run the study (experiment.py --config ...) first")
    begin, end = readme_markers(cfg.name)
    text = readme.read_text(encoding="utf-8")
    if text.count(begin) != 1 or text.count(end) != 1:
        raise KDError(f"{readme} needs exactly one {begin} ... {end} block for the tables of study {cfg.name!r}")
    docs_dir.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copy2(summary_path, docs_dir / "summary.json"))]
    copied += [Path(shutil.copy2(plots_dir(cfg) / f, docs_dir / f)) for f in PUBLISHED_FIGURES
               if (plots_dir(cfg) / f).is_file()]
    table = render_markdown(json.loads(summary_path.read_text()))
    head, rest = text.split(begin)
    readme.write_text(f"{head}{begin}\n{table}{end}{rest.split(end, 1)[1]}", encoding="utf-8")
    return copied + [readme]
