"""summary.json -> the README's Results tables (markdown). Pure: the same summary, the same text."""
from __future__ import annotations

from pathlib import Path
from typing import List

from kd.plots.style import is_number


def _f(value, digits=2) -> str:
    return f"{value:.{digits}f}" if is_number(value) else "—"


def _mean_std(s: dict, digits=2) -> str:
    if not s:
        return "—"
    std = f" ± {_f(s['std'], digits)}" if is_number(s.get("std")) else ""
    return f"{_f(s['mean'], digits)}{std} (n={s['n']})"


def _seeds(s: dict, digits=2) -> str:
    return ", ".join(_f(v, digits) for v in s["per_seed"].values()) if s else "—"


def loss_recipe(r: dict) -> str:
    terms = [f"{r['alpha_mlm']:g}·CE"] if r["alpha_mlm"] else []
    if r["alpha_kd"]:
        where = " all positions" if r.get("kd_positions") == "all" else ""
        source = " top-64 cache" if r.get("teacher_cache") else ""
        terms.append(f"{r['alpha_kd']:g}·KL(T={r['temperature']:g}{where}{source})")
    if r["alpha_hidden"]:
        terms.append(f"{r['alpha_hidden']:g}·{r['hidden_loss']}")
    if r.get("alpha_attn_kl"):
        terms.append(f"{r['alpha_attn_kl']:g}·attention KL")
    if r.get("alpha_relation_kl"):
        terms.append(f"{r['alpha_relation_kl']:g}·Q/K/V relation KL ({r['relation_heads']} heads)")
    if r.get("alpha_attn_mse"):
        terms.append(f"{r['alpha_attn_mse']:g}·attention MSE")
    return " + ".join(terms)


def shape_name(r: dict) -> str:
    """Layers, and the width when the student's differs from its teacher's (a pruned or random student)."""
    if not r["num_layers"]:
        return "—"
    return f"{r['num_layers']} × {r['hidden_size']}" if r.get("hidden_size") else str(r["num_layers"])


def init_name(r: dict) -> str:
    if r["init"] == "teacher_layers":
        layers = f"layers {r['init_layers']}" if r.get("init_layers") else "layers"
        source = teacher_name({"teacher": r["init_layers_from"]}) if r.get("init_layers_from") else "teacher"
        return f"{source} {layers}"
    if r["init"] == "pruned":
        return "teacher pruned (activation importance)"
    if r["init"].startswith("pretrained:"):
        ref = Path(r["init"].split(":", 1)[1])
        if str(ref) == "packaged-minilm":
            return "MiniLM-L6-H384 (packaged)"
        return f"{ref.parent.name} (pretrained)" if ref.name == "final" else str(ref)
    return r["init"]


def teacher_name(r: dict) -> str:
    """Exports are <checkpoint_dir>/<run>/final, or export_step_NNNNNN for a copy made during a run."""
    if not r.get("teacher"):
        return "—"
    path = Path(r["teacher"])
    if path.name.startswith("export_step_"):
        return f"{path.parent.name}@{int(path.name.rsplit('_', 1)[1])}"
    return path.parent.name


def pretraining_table(groups: List[dict], rows: List[dict], with_speed: bool) -> List[str]:
    latency = {r["run"]: r.get("cpu_latency_ms_b1") for r in rows}
    head = "| run | layers (× width) | init | teacher | loss | held-out MLM loss (mean ± std) | per seed | masked acc % | agrees with teacher % | params (M) |"
    rule = "|:---|---:|:---|:---|:---|---:|:---|---:|---:|---:|"
    if with_speed:
        head += " CPU latency b1 (ms) |"
        rule += "---:|"
    lines = [head, rule]
    for g in groups:
        r = g["recipe"]
        agree = _f(g["teacher_agreement_pct"]["mean"]) if g.get("teacher_agreement_pct") else "—"
        line = (f"| {g['group']} | {shape_name(r)} | {init_name(r)} | {teacher_name(r)} "
                f"| {loss_recipe(r)} | {_mean_std(g['heldout_mlm_loss'], 3)} | {_seeds(g['heldout_mlm_loss'], 3)} "
                f"| {_f((g['masked_accuracy_pct'] or {}).get('mean'))} | {agree} "
                f"| {_f(g['num_parameters'] / 1e6 if g.get('num_parameters') else None)} |")
        if with_speed:
            line += f" {_f(latency.get(g['runs'][0]), 1)} |"
        lines.append(line)
    return lines


def finetune_table(groups: List[dict]) -> List[str]:
    lines = ["| fine-tune | pretrained model | task KD from | test acc % (mean ± std) | per seed | validation acc % "
             "| validation curve (step: acc) |", "|:---|:---|:---|---:|:---|---:|:---|"]
    for g in groups:
        curve = ", ".join(f"{s}: {_f(v, 1)}" for s, v in g["validation_curve"].items())
        lines.append(f"| {g['group']} | {g['model']} | {g['task_teacher'] or '—'} | {_mean_std(g['test_accuracy_pct'])} "
                     f"| {_seeds(g['test_accuracy_pct'])} | {_mean_std(g['validation_accuracy_pct'])} | {curve} |")
    return lines


def two_by_two_table(cells: dict, floor) -> List[str]:
    def cell(name):
        return _mean_std(cells.get(name)) if cells.get(name) else "—"
    lines = ["| test acc % | no task KD | task KD from the fine-tuned teacher |", "|:---|---:|---:|",
             f"| **pretraining KD** | {cell('pretrain_kd_only')} | {cell('both')} |",
             f"| **no pretraining KD** | {cell('neither')} | {cell('task_kd_only')} |"]
    extra = []
    if cells.get("teacher"):
        extra.append(f"the fine-tuned teacher scores {cell('teacher')}")
    if is_number(floor):
        extra.append(f"always answering the majority class scores {_f(floor)}")
    return lines + (["", "Beside it: " + "; ".join(extra) + "."] if extra else [])


def comparisons_table(comparisons: List[dict], rule: dict) -> List[str]:
    lines = [f"| question (a vs b) | metric | a | b | gain of a | {rule['std_multiple']:g} × pooled std "
             f"| paired t-test p | verdict |", "|:---|:---|---:|---:|---:|---:|---:|:---|"]
    for c in comparisons:
        digits = 3 if c["metric"] == "heldout_mlm_loss" else 2
        verdict = {"a wins": f"**{c['a']} wins**", "b wins": f"**{c['b']} wins**"}.get(c["verdict"], "within noise")
        lines.append(f"| {c['question']} ({c['a']} vs {c['b']}) | {c['metric'].replace('_', ' ')} "
                     f"| {_f(c['mean_a'], digits)} | {_f(c['mean_b'], digits)} | {_f(c['gain'], digits)} "
                     f"| {_f(c['threshold'], digits)} | {_f(c['paired_p'], 3)} | {verdict} |")
    return lines


def dose_table(levels: List[dict]) -> List[str]:
    lines = ["| teacher | teacher loss | no-KD loss | KD loss | teacher's lead | KD gain (mean ± std) | per seed |",
             "|:---|---:|---:|---:|---:|---:|:---|"]
    for d in levels:
        lines.append(f"| {d['teacher']} | {_f(d['teacher_loss'], 3)} | {_f(d['nokd_loss'], 3)} | {_f(d['kd_loss'], 3)} "
                     f"| {_f(d['teacher_lead'], 3)} | {_mean_std(d['kd_gain'], 3)} | {_seeds(d['kd_gain'], 3)} |")
    return lines


EQUAL_COMPUTE_NAMES = {"nokd": "no KD", "kd_masked": "online KD, KL at masked positions",
                       "kd_all_positions": "online KD, KL at every position", "kd_cache": "KD from the top-64 cache"}


def equal_compute_table(ec: dict) -> List[str]:
    lines = ["| recipe | run | GFLOP per step | seconds per step (measured) | one-off cost | final held-out loss |",
             "|:---|:---|---:|---:|:---|---:|"]
    for role, r in ec.get("runs", {}).items():
        setup = (f"{_f(r['setup_flops'] / 1e12, 1)} TFLOP, {_f(r['setup_seconds'] / 60, 1)} min"
                 if r["setup_flops"] else "—")
        final = r["curve"][-1][1] if r["curve"] else None
        lines.append(f"| {EQUAL_COMPUTE_NAMES.get(role, role)} | {r['run']} | {_f(r['flops_per_step'] / 1e9, 0)} "
                     f"| {_f(r['seconds_per_step'])} | {setup} | {_f(final, 3)} |")
    t = ec.get("timing")
    if t:
        lines += ["", f"Seconds: {t['method']}, {t['rounds']} rounds, {t['threads']} threads, batch {t['batch']}."]
    return lines


def render_markdown(summary: dict) -> str:
    """The README's Results tables, from summary.json alone."""
    rule = summary["noise_rule"]
    headline = [g for g in summary["pretraining_groups"] if not g["lever"]]
    levers = [g for g in summary["pretraining_groups"] if g["lever"]]
    lines = [f"Noise rule (fixed before the runs): a difference counts as a win only when it exceeds "
             f"{rule['std_multiple']:g}× the pooled std of the two arms, or when a paired t-test over seeds gives "
             f"p < {rule['paired_alpha']:g}. Every run is reported; seeds are listed in run order.", "",
             "**Pre-registered comparisons**", ""]
    lines += comparisons_table(summary["comparisons"], rule)
    lines += ["", "**Pretraining**, scored on the whole held-out split of the Wikipedia sample, the same masks for "
                  "every model:", ""]
    lines += pretraining_table(headline, summary["pretraining"], with_speed=True)
    majority = summary.get("majority_class_pct") or {}
    if summary.get("two_by_two"):
        lines += ["", "**Two-stage distillation**, tweet sentiment test accuracy (2,280 tweets), mean ± std over "
                      "seeds:", ""]
        lines += two_by_two_table(summary["two_by_two"], majority.get("test"))
    ft = summary["finetune_groups"]
    if ft:
        lines += ["", "**Every fine-tune group** (test split; validation accuracy through training):", ""]
        lines += finetune_table(ft)
    if summary.get("dose_response"):
        lines += ["", "**Dose-response**: KD gain (no-KD loss − KD loss, paired by seed) against the teacher's lead "
                      "(no-KD loss − teacher loss):", ""]
        lines += dose_table(summary["dose_response"])
    if summary.get("equal_compute", {}).get("runs"):
        lines += ["", "**Equal compute** (seed 0 of each recipe):", ""]
        lines += equal_compute_table(summary["equal_compute"])
    if levers:
        lines += ["", "**Lever runs** (pretraining, same steps and data):", ""]
        lines += pretraining_table(levers, summary["pretraining"], with_speed=False)
    lines += ["", "Published reference numbers (papers, not measured here: SST-2 dev/test and SQuAD, "
              "full-scale pretraining):", "", "| model | params (M) | SST-2 acc % | SQuAD F1 % |",
              "|:---|---:|---:|---:|"]
    for r in summary["published"]:
        lines.append(f"| {r['model']} *(published)* | {_f(r['params_M'], 1)} | {_f(r.get('SST-2 acc %'), 1)} "
                     f"| {_f(r.get('SQuAD F1 %'), 1)} |")
    lines += ["", f"Compute: {summary['total_minutes']} min for the headline stages"
              + (f", plus {summary['lever_minutes']} min for the levers" if summary.get("lever_minutes") else "")
              + f" (logs/{summary['name']}/stages.json)."]
    return "\n".join(lines) + "\n"
