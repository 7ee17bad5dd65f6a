"""The offline study driver: its plan, resume and change detection, the summary, and a tiny real run."""
import json
import statistics
from pathlib import Path

import pytest

from kd import experiment
from kd.errors import KDError
from tests.conftest import PY, ROOT, run_script


def load(overrides=(), path=Path(ROOT) / "configs" / "experiment.yaml"):
    return experiment.load_experiment(str(path), list(overrides))


def test_plan_runs_teacher_students_finetunes_in_order():
    cfg = load()
    stages = experiment.plan(cfg)
    kinds = [s.kind for s in stages]
    assert kinds == ["pretrain"] * 4 + ["finetune"] * 12
    assert [s.run for s in stages[:4]] == ["teacher", "kd", "nokd", "kd-random"]
    kd, nokd, rand = stages[1:4]
    assert "teacher.name=checkpoints/experiment/teacher/final" in kd.argv
    assert "loss.alpha_kd=0" in nokd.argv and "student.init=random" in rand.argv
    assert not any(a.startswith("teacher.name") for a in stages[0].argv)
    # every student gets the same steps and data as the others; overrides come last and win
    common = [a for a in kd.argv if a.startswith("train.")]
    assert common and all(a in nokd.argv and a in rand.argv for a in common)
    seeds = [a for s in stages if s.kind == "finetune" for a in s.argv if a.startswith("train.seed=")]
    assert sorted(set(seeds)) == ["train.seed=0", "train.seed=1", "train.seed=2"]
    assert stages[4].output == Path("logs/experiment/teacher-tweets-s0/results.json")


def test_levers_run_only_when_asked_and_need_an_earlier_teacher():
    lever = ["levers={kd-t4: {config: configs/demo.yaml, teacher: teacher, overrides: [loss.temperature=4]}}"]
    assert all(s.kind != "lever" for s in experiment.plan(load(lever)))
    stages = experiment.plan(load(lever + ["run_levers=true"]))
    assert stages[-1].run == "kd-t4" and stages[-1].kind == "lever" and "loss.temperature=4" in stages[-1].argv
    longer = experiment.plan(load(["levers={t2: {config: c.yaml, init_from: teacher}}", "run_levers=true"]))[-1]
    assert "student.init=pretrained:checkpoints/experiment/teacher/final" in longer.argv
    with pytest.raises(KDError, match="not an earlier run"):
        experiment.plan(load(["levers={x: {config: c.yaml, teacher: nobody}}", "run_levers=true"]))
    with pytest.raises(KDError, match="not a pretraining run"):
        experiment.plan(load(["finetune.models=[teacher, ghost]"]))
    with pytest.raises(KDError, match="unknown config key 'finetune.seed'"):
        load(["finetune.seed=3"])


def fake_runner(calls, fail=()):
    """Stands in for torchrun: records the run, writes its config.yaml and its output file."""
    from kd.config import to_yaml

    def run(stage, nproc, out_path):
        calls.append(stage.run)
        out_path.write_text(f"output of {stage.run}\nerror: something broke\n")
        stage.log_dir.mkdir(parents=True, exist_ok=True)
        (stage.log_dir / "config.yaml").write_text(to_yaml(stage.resolve()))
        if stage.run in fail:
            return 1
        stage.output.parent.mkdir(parents=True, exist_ok=True)
        stage.output.write_text("{}")
        return 0
    return run


def test_rerun_skips_finished_stages_and_refuses_changed_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(Path(ROOT) / "configs")
    cfg = load(["finetune.seeds=[0]"])
    quiet = dict(say=lambda *_: None)
    calls = []
    with pytest.raises(KDError, match=r"stage nokd failed \(exit code 1\)(.|\n)*error: something broke"):
        experiment.run_stages(cfg, experiment.plan(cfg), runner=fake_runner(calls, fail={"nokd"}), **quiet)
    assert calls == ["teacher", "kd", "nokd"]
    record = json.loads((tmp_path / "logs/experiment/stages.json").read_text())
    assert "argv" in record["kd"] and "argv" not in record["nokd"]  # a failed stage is not marked done
    calls.clear()
    said = []
    minutes = experiment.run_stages(cfg, experiment.plan(cfg), runner=fake_runner(calls), say=said.append)
    assert calls[0] == "nokd" and len(calls) == 6
    assert sum("skipped" in line for line in said) == 2 and set(minutes) >= {"teacher", "kd", "nokd-tweets-s0"}
    calls.clear()
    experiment.run_stages(cfg, experiment.plan(cfg), runner=fake_runner(calls), **quiet)
    assert calls == []
    changed = load(["finetune.seeds=[0]", "pretrain_overrides=[train.max_steps=5]"])
    with pytest.raises(KDError, match=r"stage teacher already finished with other settings \((.*; )?"
                                      r"train.max_steps: 300 -> 5(.|\n)*delete logs/experiment/teacher and "
                                      r"checkpoints/experiment/teacher "):
        experiment.run_stages(changed, experiment.plan(changed), runner=fake_runner(calls), **quiet)
    fewer = load(["finetune.seeds=[0]", "nproc=1"])
    with pytest.raises(KDError, match="nproc: 2 -> 1"):
        experiment.run_stages(fewer, experiment.plan(fewer), runner=fake_runner(calls), **quiet)
    # an edited preset counts too, not only the command line
    preset = tmp_path / "kd_preset.yaml"
    preset.write_text((Path(ROOT) / "configs" / "demo.yaml").read_text())
    edited = load(["finetune.seeds=[0]", f"pretrain.kd.config={preset}"])
    experiment.run_stages(edited, experiment.plan(edited)[:2], runner=fake_runner(calls), **quiet)
    preset.write_text(preset.read_text().replace("temperature: 2.0", "temperature: 3.0"))
    with pytest.raises(KDError, match="loss.temperature: 2.0 -> 3.0"):
        experiment.run_stages(edited, experiment.plan(edited)[:2], runner=fake_runner(calls), **quiet)
    assert calls == []


def test_tiny_study_end_to_end(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    """Real torchrun runs of a tiny study: summary.json, results.md and the figures agree with the logs."""
    study = tmp_path / "study.yaml"
    pretrain = [f"data.source=text", f"data.train_files=[{corpus_file}]", "data.validation_fraction=0.2",
                "data.seq_len=64", f"data.cache_dir={shared_cache}", "train.max_steps=4", "train.batch_size=4",
                "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=2", "train.save_every=2",
                "train.log_every=1", "student.num_layers=2"]
    study.write_text(json.dumps({
        "name": "tiny", "nproc": 1, "log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ckpt"),
        "plots_dir": str(tmp_path / "plots"), "pretrain_overrides": pretrain,
        "pretrain": {
            "teacher": {"config": f"{ROOT}/configs/demo_teacher.yaml",
                        "overrides": [f"student.init=pretrained:{tiny_teacher_dir}", "student.num_layers=4"]},
            "kd": {"config": f"{ROOT}/configs/demo.yaml", "teacher": "teacher"},
        },
        "finetune": {"config": f"{ROOT}/configs/finetune_tweets.yaml", "models": ["kd"], "seeds": [0, 1],
                     "overrides": ["data.source=pang-lee", "train.max_steps=3", "train.batch_size=8"]},
    }))
    result = run_script([PY, "experiment.py", "--config", str(study), "--no-latency"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    logs = tmp_path / "logs" / "tiny"
    summary = json.loads((logs / "summary.json").read_text())
    kd_row = next(r for r in summary["pretraining"] if r["run"] == "kd")
    last_eval = [json.loads(l) for l in (logs / "kd" / "metrics.jsonl").read_text().splitlines() if "eval/mlm_ce" in l][-1]
    assert kd_row["heldout_mlm_loss"] == last_eval["eval/mlm_ce"] and kd_row["step"] == 4
    assert kd_row["init"] == "teacher_layers" and kd_row["alpha_kd"] > 0
    accs = [json.loads((logs / f"kd-tweets-s{s}" / "results.json").read_text())["test"]["accuracy"] for s in (0, 1)]
    kd_acc = next(r for r in summary["sentiment"] if r["model"] == "kd")["test_accuracy_pct"]
    assert kd_acc["n"] == 2 and kd_acc["mean"] == pytest.approx(statistics.fmean(accs))
    assert kd_acc["std"] == pytest.approx(statistics.stdev(accs))
    from kd.study_report import render_markdown
    assert (logs / "results.md").read_text() == render_markdown(summary)
    assert (tmp_path / "plots" / "tiny" / "study.png").stat().st_size > 0
    assert set(summary["minutes"]) == {"teacher", "kd", "kd-tweets-s0", "kd-tweets-s1"}
    again = run_script([PY, "experiment.py", "--config", str(study), "--no-latency"])
    assert again.returncode == 0 and again.stdout.count("skipped") == 4


def test_readme_results_match_the_committed_summary():
    """The README's Results tables are render_markdown(docs/experiment/summary.json), verbatim."""
    from kd.study_report import render_markdown
    summary = json.loads((Path(ROOT) / "docs" / "experiment" / "summary.json").read_text())
    readme = (Path(ROOT) / "README.md").read_text()
    assert render_markdown(summary) in readme
