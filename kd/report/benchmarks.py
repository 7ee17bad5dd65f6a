"""The model-comparison table: each model folder's size, speed and fine-tuned quality, then the
published reference numbers, kept apart by a `source` column (measured / published).

Speed comes from kd/latency.py, every model timed round robin so that load from other programs
falls on all alike; quality is the mean over seeds of the results.json files naming the model.
Without --models, `default_models` picks the pretraining exports and the local models that
results.json files name; `export_labels` names each export after the run that wrote it.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from kd.plots.style import METRIC_NAMES, TASK_NAMES
from kd.report.runs import aggregate_results, model_key, read_json, repo_root

log = logging.getLogger(__name__)

# DESIGN §4. Kept apart from measured rows everywhere: different tasks, data and hardware.
PUBLISHED = [
    {"model": "BERT-base", "params_M": 110.0, "SST-2 acc %": 92.7, "SQuAD F1 %": 88.5,
     "note": "dev sets"},
    {"model": "DistilBERT (6x768)", "params_M": 66.0, "SST-2 acc %": 91.3, "SQuAD F1 %": 86.9,
     "note": "dev sets; SQuAD F1 with task distillation"},
    {"model": "BERT-large", "params_M": 340.0, "SST-2 acc %": 94.9, "note": "SST-2 test set"},
    {"model": "MiniLM-L6-H384", "params_M": 22.7, "SST-2 acc %": 91.5, "note": "dev set"},
]


def published_table() -> pd.DataFrame:
    return pd.DataFrame(PUBLISHED).assign(source="published")


def quality_column(task: str, metric: str, split: str = "") -> str:
    """e.g. "sentiment-tweets (test) acc %": the header names the task (and split) of the number."""
    where = f"{TASK_NAMES.get(task, task)} ({split})" if split else TASK_NAMES.get(task, task)
    return f"{where} {METRIC_NAMES.get(metric, metric)} %"


def count_parameters(model_dir) -> int | None:
    """Parameters stored in the folder's safetensors files (read from headers, nothing loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def folder_size_mb(model_dir) -> float:
    return sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file()) / 1e6


def short_label(path: Path) -> str:
    # Exports usually end in a generic folder name: checkpoints/<run>/final.
    if path.name in {"final", "best", "last", "export", "model", "hf"} and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _shown_path(path: Path) -> str:
    # Relative to the working directory when inside it: short, and what a user would type.
    rel = os.path.relpath(Path(path).resolve())
    return str(path) if rel.startswith("..") else rel


def benchmark_table(models, results: pd.DataFrame, device: str = "auto", latency: bool = True,
                    repeats: int = 10, seq_len: int = 128, labels: dict | None = None) -> pd.DataFrame:
    """Measured rows for each model folder (size, speed, quality from results), then published rows.

    `labels` maps model_key(path) to a display name (e.g. the run that exported it).
    """
    from kd import latency as lat

    labels = labels or {}
    agg = aggregate_results(results)
    dev = lat.resolve_device(device) if latency else None
    folders = []
    for path in models:
        folder = Path(path)
        if not folder.is_dir():
            log.warning(f"model folder {path} does not exist: skipped")
        elif not (folder / "config.json").is_file():
            log.warning(f"{path} is not a Hugging Face model folder (no config.json): skipped")
        else:
            folders.append(folder)
    timings = [{} for _ in folders]
    if latency and folders:  # all models together, round robin: the same load falls on each
        log.info(f"timing {len(folders)} model(s) on {dev.type}, {repeats} interleaved rounds...")
        timings = lat.measure_latencies(folders, device=dev.type, repeats=repeats, seq_len=seq_len)
    rows = []
    for folder, timing in zip(folders, timings):
        key = model_key(folder)
        row = {"model": labels.get(key) or short_label(folder), "source": "measured", "path": _shown_path(folder),
               "params_M": np.nan, "size_MB": folder_size_mb(folder)}
        params = count_parameters(folder)
        if "error" in timing:
            log.warning(f"{folder}: {timing['error']}; speed columns left empty")
        elif timing:
            params = params or timing["encoder_parameters"]
            row.update({k: v for k, v in timing.items() if k != "encoder_parameters"})
        row["params_M"] = params / 1e6 if params else np.nan
        quality = agg[agg["model_key"] == key]
        if quality.empty:
            log.warning(f"{row['model']}: no fine-tune result (results.json with model={folder}); "
                        f"quality columns left empty")
        for q in quality.itertuples():
            col = quality_column(q.task, q.metric, q.split)
            row.update({col: q.mean, f"{col} std": q.std, f"{col} n": int(q.n)})
        rows.append(row)
    unmatched = set(agg["model_key"]) - {model_key(p) for p in models if Path(p).is_dir()}
    for key in sorted(unmatched):
        log.info(f"fine-tune results exist for {key}, which is not benchmarked (add it to --models)")
    table = pd.concat([pd.DataFrame(rows), published_table()], ignore_index=True)
    counts = [c for c in table.columns if c in ("repeats", "warmup", "seq_len") or c.endswith(" n")]
    return table.astype({c: "Int64" for c in counts})  # NaN in published rows must not make 10 read 10.0


def default_models(logs_dir, results: pd.DataFrame) -> tuple[list[Path], dict]:
    """Exports of pretraining runs and local models named in results.json, plus display labels.

    Fine-tune exports are left out: their quality is filed under the model they started from.
    """
    logs_dir = Path(logs_dir)
    models, labels = {}, {}
    for run_json in sorted(logs_dir.glob("*/run.json")):
        info = read_json(run_json, quiet=True) or {}
        if info.get("kind", "pretrain") != "pretrain" or not info.get("export_dir"):
            continue
        key = model_key(info["export_dir"], repo_root(logs_dir))
        if Path(key).is_dir():
            models.setdefault(key, Path(key))
            labels[key] = run_json.parent.name
        else:
            log.info(f"run {run_json.parent.name}: export {info['export_dir']} does not exist yet; not benchmarked")
    for ref, key in results[["model", "model_key"]].drop_duplicates().itertuples(index=False):
        if Path(key).is_dir():
            models.setdefault(key, Path(key))
            labels.setdefault(key, ref if not Path(ref).exists() else short_label(Path(ref)))
    return list(models.values()), labels


def export_labels(logs_dir) -> dict:
    """model_key(export_dir) -> run name, for every run.json under logs_dir."""
    labels = {}
    for run_json in sorted(Path(logs_dir).glob("*/run.json")):
        info = read_json(run_json, quiet=True) or {}  # load_run has already said what is wrong
        if info.get("export_dir"):
            labels[model_key(info["export_dir"], repo_root(logs_dir))] = run_json.parent.name
    return labels
