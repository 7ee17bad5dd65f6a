"""Convergence plots, fine-tuning curves and benchmark tables from `logs/` (DESIGN §1, step 3).

Inputs are what the training code writes: logs/<run>/run.json, metrics.jsonl, results.json, and
optionally logs/bench/*.json. Missing pieces are expected (a run still going, a model never
fine-tuned): each is reported in one log line and everything that can still be made is made.

Reading the logs and building the tables lives here; the figures are in kd/plots.py and are
re-exported, so `from kd.report import plot_convergence` works too.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kd.errors import KDError
from kd.plots import (METRIC_NAMES, TASK_NAMES, fmt_number, is_number, plot_bench_throughput,  # noqa: F401
                      plot_benchmarks, plot_convergence, plot_finetune, run_colors, step_to_tokens)

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


# ---------------------------------------------------------------------------------------- loading

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


def _read_json(path: Path, quiet: bool = False) -> dict | None:
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
               info=_read_json(log_dir / "run.json") or {},
               records=read_metrics(metrics) if metrics.is_file() else [],
               results=_read_json(log_dir / "results.json"))


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


def _repo_root(logs_dir) -> Path:
    return Path(logs_dir).resolve().parent


def load_results(logs_dir) -> pd.DataFrame:
    """Every logs/*/results.json, one row per (run, metric). Read regardless of --runs."""
    rows = []
    for path in sorted(Path(logs_dir).glob("*/results.json")):
        res = _read_json(path)
        if res is None:
            continue
        if not res.get("model") or not isinstance(res.get("metrics"), dict):
            log.warning(f"{path}: no 'model' or 'metrics'; ignored")
            continue
        for metric, value in res["metrics"].items():
            if is_number(value):
                rows.append({"run": path.parent.name, "model": res["model"],
                             "model_key": model_key(res["model"], _repo_root(logs_dir)),
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


def quality_column(task: str, metric: str, split: str = "") -> str:
    """e.g. "sentiment-tweets (test) acc %": the header names the task (and split) of the number."""
    where = f"{TASK_NAMES.get(task, task)} ({split})" if split else TASK_NAMES.get(task, task)
    return f"{where} {METRIC_NAMES.get(metric, metric)} %"


def runs_table(runs) -> pd.DataFrame:
    """One row per run: size from run.json and the latest (or best) logged numbers."""
    rows = []
    for run in runs:
        def last(key):
            _, y = run.series(key)
            return y[-1] if len(y) else np.nan
        _, eval_loss = run.series("eval/loss")
        params = run.info.get("num_parameters")
        rows.append({"run": run.name, "kind": run.kind, "task": run.task if run.kind == "finetune" else "",
                     "params_M": params / 1e6 if is_number(params) else np.nan,
                     "device": run.info.get("device", ""), "world_size": run.info.get("world_size", np.nan),
                     "steps": last("step"), "tokens_seen": last("tokens_seen"),
                     "last_train_loss": last("train/loss"),
                     "best_eval_loss": eval_loss.min() if len(eval_loss) else np.nan,
                     "perplexity": last("eval/perplexity"), "masked_acc_%": last("eval/masked_accuracy"),
                     "teacher_agreement_%": last("eval/teacher_agreement"),
                     "accuracy_%": last("eval/accuracy"), "f1_%": last("eval/f1")})
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------- benchmark table

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


def _short_label(path: Path) -> str:
    # Exports usually end in a generic folder name: checkpoints/<run>/final.
    if path.name in {"final", "best", "last", "export", "model", "hf"} and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _shown_path(path: Path) -> str:
    # Relative to the working directory when inside it: short, and what a user would type.
    rel = os.path.relpath(Path(path).resolve())
    return str(path) if rel.startswith("..") else rel


def published_table() -> pd.DataFrame:
    return pd.DataFrame(PUBLISHED).assign(source="published")


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
        row = {"model": labels.get(key) or _short_label(folder), "source": "measured", "path": _shown_path(folder),
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
            log.warning(f"{row['model']}: no fine-tune result (results.json with model={path}); "
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


def _cell(value, integral=False) -> str:
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return fmt_number(value, integral)
    return str(value).replace("|", "\\|")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table (pandas' own to_markdown needs tabulate, which we do not ship)."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    integral = [n and df[c].notna().any() and bool((df[c].dropna() % 1 == 0).all())
                for c, n in zip(df.columns, numeric)]
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"
    body = ["| " + " | ".join(_cell(v, i) for v, i in zip(row, integral)) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _quality_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.endswith(" %") and f"{c} n" in df.columns]


def _mean_std(mean, std, n) -> str:
    if not is_number(mean):
        return "—"
    spread = f" ± {std:.2f}" if is_number(std) else ""
    return f"{mean:.2f}{spread} (n={int(n)})"


def write_benchmarks(table: pd.DataFrame, out_dir) -> list[Path]:
    """benchmarks.csv (every row, `source` column) and benchmarks.md (measured and published apart)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "benchmarks.csv"
    table.to_csv(csv, index=False)
    measured = table[table["source"] == "measured"]
    published = table[table["source"] == "published"]
    lines = ["# Model benchmarks", "", "## Measured here", ""]
    if measured.empty:
        lines.append("No model folders were benchmarked.")
    else:
        shown = pd.DataFrame({"model": measured["model"], "params (M)": measured["params_M"],
                              "size on disk (MB)": measured["size_MB"]})
        if "latency_ms_b1" in measured:
            shown["latency b1 (ms)"] = measured["latency_ms_b1"]
            shown["IQR (ms)"] = measured["latency_ms_b1_iqr"]
            shown["throughput b32 (seq/s)"] = measured["throughput_seq_s_b32"]
            shown["IQR (seq/s)"] = measured["throughput_seq_s_b32_iqr"]
        for col in _quality_columns(measured):
            shown[col] = [_mean_std(m, s, n) for m, s, n in
                          zip(measured[col], measured[f"{col} std"], measured[f"{col} n"])]
        shown["path"] = measured["path"]
        lines += [to_markdown(shown), ""]
        if "latency_ms_b1" in measured and measured["latency_ms_b1"].notna().any():
            timed = measured.dropna(subset=["latency_ms_b1"]).iloc[0]
            lines.append(f"Speed: encoder forward only, fp32, seq {int(timed['seq_len'])}, random token ids; "
                         f"every model timed in turn, {int(timed['repeats'])} rounds after {int(timed['warmup'])} "
                         f"warm-up round(s) (torch.utils.benchmark blocked_autorange); median over rounds "
                         f"and the interquartile range, on {timed['device']}.")
        else:
            lines.append("Speed: not measured (--no-latency, or no model could be timed).")
        lines.append("Params: tensors stored in the folder's safetensors (an exported MLM head counts); "
                     "size: all files in the folder, 1 MB = 10^6 bytes.")
        lines.append("Quality: mean ± sample std over fine-tuning seeds, as reported in each run's "
                     "results.json; the column names the task the number comes from.")
    lines += ["", "## Published reference numbers (not measured here)", ""]
    pub = published[[c for c in published_table().columns if c != "source"]]
    pub = pub.rename(columns={c: f"{c} (published)" for c in pub.columns if c.endswith(" %")})
    lines += [to_markdown(pub.rename(columns={"params_M": "params (M)"})), "",
              "From the papers (DESIGN §4). Other tasks and data than the measured rows above: our "
              "sentiment accuracy is on an offline tweet set, not SST-2.", ""]
    md = out_dir / "benchmarks.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return [md, csv]


# ------------------------------------------------------------------------------------ entry point

def default_models(logs_dir, results: pd.DataFrame) -> tuple[list[Path], dict]:
    """Exports of pretraining runs and local models named in results.json, plus display labels.

    Fine-tune exports are left out: their quality is filed under the model they started from.
    """
    logs_dir = Path(logs_dir)
    models, labels = {}, {}
    for run_json in sorted(logs_dir.glob("*/run.json")):
        info = _read_json(run_json, quiet=True) or {}
        if info.get("kind", "pretrain") != "pretrain" or not info.get("export_dir"):
            continue
        key = model_key(info["export_dir"], _repo_root(logs_dir))
        if Path(key).is_dir():
            models.setdefault(key, Path(key))
            labels[key] = run_json.parent.name
        else:
            log.info(f"run {run_json.parent.name}: export {info['export_dir']} does not exist yet; not benchmarked")
    for ref, key in results[["model", "model_key"]].drop_duplicates().itertuples(index=False):
        if Path(key).is_dir():
            models.setdefault(key, Path(key))
            labels.setdefault(key, ref if not Path(ref).exists() else _short_label(Path(ref)))
    return list(models.values()), labels


def export_labels(logs_dir) -> dict:
    """model_key(export_dir) -> run name, for every run.json under logs_dir."""
    labels = {}
    for run_json in sorted(Path(logs_dir).glob("*/run.json")):
        info = _read_json(run_json, quiet=True) or {}  # load_run has already said what is wrong
        if info.get("export_dir"):
            labels[model_key(info["export_dir"], _repo_root(logs_dir))] = run_json.parent.name
    return labels


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
    colors = run_colors([r.name for r in runs] + [labels.get(model_key(m), _short_label(Path(m))) for m in models])
    written = plot_convergence(runs, plots_dir, colors) + plot_finetune(runs, plots_dir, colors)
    if runs:
        plots_dir.mkdir(parents=True, exist_ok=True)
        table = runs_table(runs)
        (plots_dir / "runs.md").write_text("# Runs\n\n" + to_markdown(table) + "\n", encoding="utf-8")
        table.to_csv(plots_dir / "runs.csv", index=False)
        written += [plots_dir / "runs.md", plots_dir / "runs.csv"]
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
    benches = [(f.stem, b) for f in files if (b := _read_json(f)) and isinstance(b.get("variants"), dict)]
    if not benches:
        log.info(f"no {Path(logs_dir) / 'bench'}/*.json: throughput benchmark chart skipped")
    return plot_bench_throughput(benches, out_dir)
