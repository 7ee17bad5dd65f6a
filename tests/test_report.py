"""compare_benchmarks.py / kd.report / kd.latency on small hand-written logs and a tiny BERT."""
import json
import logging
import math
import statistics

import pandas as pd
import pytest
import torch

from kd import report
from kd.errors import KDError
from kd.latency import measure_latency
from kd.plots.convergence import plot_convergence, step_to_tokens
from kd.report.benchmarks import benchmark_table
from kd.report.runs import Run, find_runs, load_results, read_metrics

TOKENS_PER_STEP = 4096


def write_jsonl(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def pretrain_records(steps, kd=True, evals=True):
    records = []
    for step in steps:
        rec = {"step": step, "epoch": 0, "tokens_seen": step * TOKENS_PER_STEP, "lr": 1e-4 * step / steps[-1],
               "tokens_per_s": 9000.0, "train/loss": 50.0 / step, "train/mlm_ce": 10.0 / step,
               "train/hidden_mse_1_2": 1.0 / step}
        if kd:
            rec["train/kd_kl"] = 5.0 / step
        records.append(rec)
        if evals and step % 20 == 0:
            records.append({"step": step, "epoch": 0, "tokens_seen": step * TOKENS_PER_STEP,
                            "eval/loss": 60.0 / step, "eval/mlm_ce": 11.0 / step,
                            "eval/perplexity": math.exp(11.0 / step), "eval/masked_accuracy": step / 2,
                            **({"eval/teacher_agreement": step / 1.5} if kd else {})})
    return records


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("models") / "demo" / "final"
    model = BertModel(cfg)
    model.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


@pytest.fixture
def logs(tmp_path, tiny_model):
    """Two pretraining runs (KD and no-KD) and two fine-tune seeds of the KD student."""
    model_dir, _ = tiny_model
    logs = tmp_path / "logs"
    for name, kd, params in (("demo", True, 1_234_567), ("demo-nokd", False, 1_000_000)):
        write_json(logs / name / "run.json", {"kind": "pretrain", "run_name": name, "num_parameters": params,
                                              "device": "cpu", "world_size": 1,
                                              "export_dir": str(model_dir) if kd else "checkpoints/missing"})
        write_jsonl(logs / name / "metrics.jsonl", pretrain_records([10, 20, 30, 40], kd=kd))
    for seed, acc in ((1, 80.0), (2, 84.0)):
        name = f"demo-ft-s{seed}"
        write_json(logs / name / "run.json", {"kind": "finetune", "run_name": name, "num_parameters": 40_000,
                                              "device": "cpu", "world_size": 1, "task": "sentiment-tweets",
                                              "export_dir": str(tmp_path / "ft" / name)})
        write_jsonl(logs / name / "metrics.jsonl",
                    [{"step": 50 * e, "epoch": e, "tokens_seen": 6400 * e, "train/loss": 0.7 / e,
                      "eval/loss": 0.8 / e, "eval/accuracy": acc - 3 + e} for e in (1, 2, 3)])
        write_json(logs / name / "results.json",
                   {"task": "sentiment-tweets", "model": str(model_dir), "run_name": name, "num_parameters": 40_000,
                    "metrics": {"accuracy": acc}, "metrics_split": "test", "split_sizes": {"train": 800, "validation": 100, "test": 100},
                    "seed": seed, "wall_time_s": 12.0, "device": "cpu"})
    return logs


def test_full_report_files_and_numbers(logs, tmp_path, tiny_model, caplog):
    model_dir, n_params = tiny_model
    caplog.set_level(logging.INFO)
    plots = tmp_path / "plots"
    written = report.build_report(logs, plots, repeats=2, seq_len=16)

    expected = {"convergence_loss.png", "convergence_terms.png", "convergence_eval.png", "convergence_lr.png",
                "finetune_sentiment-tweets.png", "benchmarks.md", "benchmarks.csv", "benchmarks_bars.png",
                "quality_vs_speed.png", "runs.md", "runs.csv"}
    assert expected <= {p.name for p in written}
    assert all((plots / name).stat().st_size > 1000 for name in expected if name.endswith(".png"))

    table = pd.read_csv(plots / "benchmarks.csv")
    measured = table[table["source"] == "measured"]
    assert list(measured["model"]) == ["demo"]  # labelled by the run that exported it
    row = measured.iloc[0]
    acc = "sentiment-tweets (test) acc %"  # the header names the task and split of the number
    assert row[acc] == pytest.approx(statistics.mean([80.0, 84.0]))
    assert row[f"{acc} std"] == pytest.approx(statistics.stdev([80.0, 84.0]))
    assert row[f"{acc} n"] == 2
    assert row["params_M"] == pytest.approx(n_params / 1e6)
    assert row["latency_ms_b1"] > 0 and row["throughput_seq_s_b32"] > 0
    published = table[table["source"] == "published"].set_index("model")
    assert published.loc["BERT-base", "SST-2 acc %"] == 92.7
    assert published.loc["DistilBERT (6x768)", "SQuAD F1 %"] == 86.9
    assert published["latency_ms_b1"].isna().all()  # nothing measured is attributed to a paper

    md = (plots / "benchmarks.md").read_text()
    measured_part, published_part = md.split("## Published")
    assert acc in measured_part and "82.00 ± 2.83 (n=2)" in measured_part
    assert "BERT-base" not in measured_part
    assert "SST-2 acc % (published)" in published_part and "92.70" in published_part

    runs = pd.read_csv(plots / "runs.csv").set_index("run")
    assert runs.loc["demo", "params_M"] == pytest.approx(1.234567)  # from run.json
    assert runs.loc["demo", "steps"] == 40
    assert "export checkpoints/missing does not exist" in caplog.text


def test_latency_on_tiny_bert(tiny_model):
    model_dir, _ = tiny_model
    result = measure_latency(model_dir, device="cpu", repeats=2, warmup=1, seq_len=16)
    assert result["repeats"] == 2 and result["seq_len"] == 16
    for key in ("latency_ms_b1", "throughput_seq_s_b32"):
        assert math.isfinite(result[key]) and result[key] > 0


def test_run_without_eval_still_plots_loss(tmp_path, caplog):
    write_jsonl(tmp_path / "logs" / "fresh" / "metrics.jsonl", pretrain_records([10, 20, 30], evals=False))
    runs = find_runs(tmp_path / "logs")
    written = plot_convergence(runs, tmp_path / "plots")
    names = {p.name for p in written}
    assert "convergence_loss.png" in names and "convergence_terms.png" in names
    assert "convergence_eval.png" not in names
    assert "run fresh: no eval records yet" in caplog.text


def test_missing_model_path_is_reported_and_skipped(caplog, tiny_model):
    model_dir, _ = tiny_model
    table = benchmark_table(["no/such/model", model_dir], load_results("no/logs"), latency=False)
    measured = table[table["source"] == "measured"]
    assert list(measured["path"]) == [str(model_dir)]
    assert "model folder no/such/model does not exist: skipped" in caplog.text
    assert "no fine-tune result" in caplog.text


def test_truncated_last_line_and_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "epoch": 0, "tokens_seen": s, "train/loss": float(s)} for s in (1, 2, 3)]
    # Resumed from the step-2 checkpoint: the old step 3 is superseded by the new one.
    records += [{"step": 3, "epoch": 0, "tokens_seen": 3, "train/loss": 30.0}, {"step": 4, "epoch": 0}]
    records.insert(3, {"step": 2, "epoch": 0, "tokens_seen": 2, "train/loss": 20.0})
    write_jsonl(path, records, tail='\n{"step": 5, "train/lo')
    got = read_metrics(path)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r.get("train/loss") for r in got] == [1.0, 20.0, 30.0, None]
    assert "truncated last line" in caplog.text


def test_tokens_axis_mapping_is_linear():
    run = Run("r", None, records=pretrain_records([10, 20, 30], evals=False))
    fwd, inv, label = step_to_tokens([run])
    assert fwd(100) == pytest.approx(100 * TOKENS_PER_STEP)
    assert inv(fwd(7.5)) == pytest.approx(7.5)
    assert label == "tokens seen"


def test_no_runs_and_unknown_runs(tmp_path, capsys, caplog):
    import compare_benchmarks

    (tmp_path / "logs").mkdir()
    args = ["--logs-dir", str(tmp_path / "logs"), "--plots-dir", str(tmp_path / "plots")]
    assert compare_benchmarks.main(args) == []
    assert "no files written" in capsys.readouterr().out
    assert "no runs found" in caplog.text
    with pytest.raises(KDError, match="no run named ghost"):
        compare_benchmarks.main(args + ["--runs", "ghost"])


def test_bench_json_chart(tmp_path):
    write_json(tmp_path / "logs" / "bench" / "tiny.json",
               {"preset": "tiny", "device": "cpu", "ratio": 1.8,
                "variants": {"ours": {"tokens_per_s": 1800.0, "peak_mem_mb": 10.0, "mfu": 0.1},
                             "naive": {"tokens_per_s": 1000.0, "peak_mem_mb": 12.0, "mfu": 0.05}}})
    written = report.plot_throughput_bench(tmp_path / "logs", tmp_path / "plots")
    assert [p.name for p in written] == ["bench_throughput.png"] and written[0].stat().st_size > 1000


def test_two_copies_of_one_model_time_alike_when_interleaved(tmp_path):
    """Identical architectures in one report must agree within 10%: the models are timed round
    robin, so load from other programs falls on both alike, and the median over rounds is kept."""
    import shutil

    from kd.latency import measure_latencies
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no intra-op thread left waiting on a busy core
    try:
        a, b, missing = measure_latencies([tmp_path / "a", tmp_path / "b", tmp_path / "nothing"], device="cpu",
                                          repeats=15, seq_len=64, min_run_time=0.03)
    finally:
        torch.set_num_threads(threads)
    assert "could not be loaded" in missing["error"]
    for key in ("latency_ms_b1", "throughput_seq_s_b32"):
        assert a[key] > 0 and a[f"{key}_iqr"] >= 0
        assert abs(a[key] - b[key]) / min(a[key], b[key]) < 0.10, (key, a[key], b[key])
