"""The report's tables as files: runs.md/.csv (one row per run) and benchmarks.md/.csv.

`to_markdown` writes a GitHub pipe table itself (pandas' own needs tabulate, which we do not
ship). The benchmark markdown shows measured and published rows in separate tables, each quality
cell as mean ± std (n) over fine-tuning seeds.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from kd.plots.style import fmt_number, is_number
from kd.report.benchmarks import published_table


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


def write_runs(runs, out_dir) -> list[Path]:
    """runs.md and runs.csv: `runs_table` as markdown and CSV."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = runs_table(runs)
    (out_dir / "runs.md").write_text("# Runs\n\n" + to_markdown(table) + "\n", encoding="utf-8")
    table.to_csv(out_dir / "runs.csv", index=False)
    return [out_dir / "runs.md", out_dir / "runs.csv"]


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
