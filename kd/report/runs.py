"""What the training code wrote, read back: runs (run.json, metrics.jsonl) and fine-tune results.

A `Run` is one folder under logs/; `read_metrics` copes with a run killed mid-write or resumed from
an earlier checkpoint. `load_results` gathers every results.json into one long table and
`aggregate_results` folds the seeds of a model into mean, std and n. `model_key` gives a model one
spelling, so a results.json's `model` matches a model folder given on the command line.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kd.errors import KDError
from kd.plots.style import is_number

log = logging.getLogger(__name__)


@dataclass
class Run:
    name: str
    log_dir: Path
    info: dict = field(default_factory=dict)  # run.json; {} while missing
    records: list = field(default_factory=list)  # metrics.jsonl
    results: dict | None = None  # results.json (fine-tune runs)

    @property
    def kind(self) -> str:
        return self.info.get("kind") or ("finetune" if self.results else "pretrain")

    @property
    def task(self) -> str:
        return self.info.get("task") or (self.results or {}).get("task") or "unknown-task"

    def has(self, key: str) -> bool:
        return any(is_number(r.get(key)) for r in self.records)

    def series(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        pts = [(r[x], r[key]) for r in self.records if is_number(r.get(key)) and is_number(r.get(x))]
        xs, ys = zip(*pts) if pts else ((), ())
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    @property
    def loss_terms(self) -> list[str]:
        return sorted({k for r in self.records for k in r if k.startswith("train/") and k != "train/loss"})

    @property
    def has_eval(self) -> bool:
        return any(k.startswith("eval/") for r in self.records for k in r)


def read_json(path: Path, quiet: bool = False) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        data = None
        problem = f"not valid JSON ({err})"
    else:
        problem = "" if isinstance(data, dict) else "expected a JSON object"
    if problem:
        if not quiet:
            log.warning(f"{path}: {problem}; ignored")
        return None
    return data


def read_metrics(path) -> list[dict]:
    """Records of a metrics.jsonl, skipping blank and unreadable lines.

    A resumed run logs again from its last checkpoint, so a step going backwards means the records
    from that step on were superseded: the later ones win.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            what = "truncated last line (run killed mid-write?)" if i == last else f"unreadable line {i + 1}"
            log.warning(f"{path}: skipped {what}")
            continue
        if not isinstance(rec, dict) or not is_number(rec.get("step")):
            log.warning(f"{path}: skipped line {i + 1} (no integer 'step')")
            continue
        if records and rec["step"] < records[-1]["step"]:
            records = [r for r in records if r["step"] < rec["step"]]
        records.append(rec)
    return records


def load_run(log_dir) -> Run:
    """One run folder: run.json, metrics.jsonl and results.json, each optional."""
    log_dir = Path(log_dir)
    metrics = log_dir / "metrics.jsonl"
    return Run(name=log_dir.name, log_dir=log_dir,
               info=read_json(log_dir / "run.json") or {},
               records=read_metrics(metrics) if metrics.is_file() else [],
               results=read_json(log_dir / "results.json"))


def find_runs(logs_dir, names=None) -> list[Run]:
    """Runs under logs_dir (folders with metrics.jsonl); named runs must exist."""
    logs_dir = Path(logs_dir)
    found = sorted(d for d in logs_dir.iterdir() if (d / "metrics.jsonl").is_file()) if logs_dir.is_dir() else []
    if names:
        missing = [n for n in names if not (logs_dir / n / "metrics.jsonl").is_file()]
        if missing:
            have = ", ".join(d.name for d in found) or "none"
            raise KDError(f"no run named {', '.join(missing)} under {logs_dir}/ (a run is a folder "
                          f"holding metrics.jsonl); runs there: {have}")
        found = [logs_dir / n for n in names]
    return [load_run(d) for d in found]


def model_key(ref, base=None) -> str:
    """One spelling per model, so results.json's `model` matches a --models path.

    A relative path is tried from the working directory, then from `base`: paths in the logs are
    relative to where training ran, normally the repo root that holds logs/. Hub names pass through.
    """
    from kd.assets import resolve_model_ref

    ref = str(ref)
    try:
        ref = resolve_model_ref(ref)
    except KDError:
        pass
    for path in (Path(ref).expanduser(), Path(base or ".") / ref):
        if path.exists():
            return str(path.resolve())
    return ref.rstrip("/")


def repo_root(logs_dir) -> Path:
    return Path(logs_dir).resolve().parent


def load_results(logs_dir) -> pd.DataFrame:
    """Every logs/*/results.json, one row per (run, metric). Read regardless of --runs."""
    rows = []
    for path in sorted(Path(logs_dir).glob("*/results.json")):
        res = read_json(path)
        if res is None:
            continue
        if not res.get("model") or not isinstance(res.get("metrics"), dict):
            log.warning(f"{path}: no 'model' or 'metrics'; ignored")
            continue
        for metric, value in res["metrics"].items():
            if is_number(value):
                rows.append({"run": path.parent.name, "model": res["model"],
                             "model_key": model_key(res["model"], repo_root(logs_dir)),
                             "task": res.get("task", "unknown-task"), "split": res.get("metrics_split") or "",
                             "metric": metric, "value": float(value),
                             "seed": res.get("seed"), "num_parameters": res.get("num_parameters")})
    return pd.DataFrame(rows, columns=["run", "model", "model_key", "task", "split", "metric", "value", "seed",
                                       "num_parameters"])


def aggregate_results(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1, NaN for a single seed) and n per (model, task, split, metric)."""
    keys = ["model_key", "task", "split", "metric"]
    if results.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n"])
    agg = results.groupby(keys)["value"].agg(["mean", "std", "count"])
    return agg.rename(columns={"count": "n"}).reset_index()
