"""The offline study: its plan, resume and change detection, the noise rule, and a tiny real study."""
import json
import time
import statistics
from pathlib import Path

import pytest

from kd.errors import KDError
from kd.study import plan as study_plan
from kd.study import runner, stats
from kd.study.spec import load_experiment
from tests.conftest import PY, ROOT, run_script


def load(overrides=(), path=Path(ROOT) / "configs" / "experiment.yaml"):
    return load_experiment(str(path), list(overrides))


def argv_of(stages, run):
    return next(s.argv for s in stages if s.run == run)


def test_plan_expands_seeds_pairs_finetunes_and_wires_task_teachers():
    stages = study_plan.plan(load())
    runs = [s.run for s in stages]
    assert runs[:7] == ["teacher", "kd-s0", "kd-s1", "kd-s2", "nokd-s0", "nokd-s1", "nokd-s2"]
    assert all(s.kind == "finetune" and s.nproc == 1 for s in stages[7:])
    assert all(s.nproc == 2 for s in stages[:7]) and not any(s.lever for s in stages)
    # twins share everything but the KD terms: same teacher (init), seed, steps and data
    kd, nokd = argv_of(stages, "kd-s1"), argv_of(stages, "nokd-s1")
    assert "train.seed=1" in kd and "train.seed=1" in nokd
    assert "teacher.name=checkpoints/experiment/teacher/final" in kd and "loss.alpha_kd=0" in nokd
    assert [a for a in kd if a.startswith("train.")] == [a for a in nokd if a.startswith("train.")]
    # a seeded model is fine-tuned once per pretraining seed, with that seed
    ft = argv_of(stages, "kd-tweets-s2")
    assert "model=checkpoints/experiment/kd-s2/final" in ft and "train.seed=2" in ft
    task = argv_of(stages, "nokd-taskkd-tweets-s0")
    assert "distill.teacher=checkpoints/experiment/teacher-tweets-s0/final" in task
    assert runs.index("teacher-tweets-s0") < runs.index("kd-taskkd-tweets-s0")


def test_levers_run_only_when_asked_and_name_exports_at_steps():
    assert not any(s.lever for s in study_plan.plan(load()))
    stages = study_plan.plan(load(["run_levers=true"]))
    weak = argv_of(stages, "kd-t150-s0")
    assert "teacher.name=checkpoints/experiment/teacher/export_step_000150" in weak
    cache = next(s for s in stages if s.run == "teacher-cache")
    assert cache.kind == "cache" and cache.output == Path("checkpoints/experiment/teacher-cache/manifest.json")
    assert "teacher_cache.path=checkpoints/experiment/teacher-cache" in argv_of(stages, "kd-cache-s0")
    assert "student.init_layers_from=checkpoints/experiment/teacher/final" in weak  # same init as kd
    # a lever fine-tune can add seeds to a headline group
    stages = study_plan.plan(load(["run_levers=true",
                                   "levers.finetune={more: {model: teacher, seeds: [1, 2], group: teacher}}"]))
    more = [s for s in stages if s.group == "teacher" and s.kind == "finetune"]
    assert [s.run for s in more] == ["teacher-tweets-s0", "teacher-tweets-s1", "teacher-tweets-s2"]
    assert [s.lever for s in more] == [False, True, True]


@pytest.mark.parametrize("override, message", [
    ("levers={pretrain: {x: {config: c.yaml, teacher: nobody}}}", "not an earlier run"),
    ("levers={pretrain: {x: {config: c.yaml, teacher: teacher@1x}}}", "run@STEP"),
    ("finetune.runs.kd.seeds=[4]", "fine-tuned with its own seed"),
    ("finetune.runs.ghost={model: ghost}", "not a pretraining run"),
    ("finetune.runs.kd.task_teacher=kd-tweets-s9", "not an earlier fine-tune run"),
    ("levers={pretrain: {kd: {config: c.yaml}}}", "called 'kd'"),
])
def test_plan_refuses_bad_wiring(override, message):
    with pytest.raises(KDError, match=message):
        study_plan.plan(load([override, "run_levers=true"]))


def test_config_errors_name_the_key():
    with pytest.raises(KDError, match="unknown config key 'finetune.seed'"):
        load(["finetune.seed=3"])
    with pytest.raises(KDError, match="metric='accuracy'"):
        load(["comparisons=[{a: kd, b: nokd, metric: accuracy}]"])


def fake_runner(calls, fail=()):
    """Stands in for torchrun: records the run, writes its config.yaml and its output file."""
    from kd.config import to_yaml

    def run(stage, out_path):
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


def small_study(tmp_path) -> Path:
    """The real study's first runs, one seed each, and one fine-tune."""
    full = study_plan.plan(load())  # noqa: F841  (the real file must plan too)
    path = tmp_path / "small.yaml"
    text = (Path(ROOT) / "configs" / "experiment.yaml").read_text()
    text = text.split("# Fine-tuning on the offline")[0].replace("seeds: [0, 1, 2]", "seeds: [0]")
    path.write_text(text + "finetune:\n  runs:\n    kd: {model: kd}\n")
    return path


def test_rerun_skips_finished_stages_and_refuses_changed_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(Path(ROOT) / "configs")
    small = small_study(tmp_path)
    few = []

    def load(overrides=()):
        return load_experiment(str(small), list(overrides))
    cfg = load(few)
    quiet = dict(say=lambda *_: None)
    calls = []
    with pytest.raises(KDError, match=r"stage nokd-s0 failed \(exit code 1\)(.|\n)*error: something broke"):
        runner.run_stages(cfg, study_plan.plan(cfg), runner=fake_runner(calls, fail={"nokd-s0"}), **quiet)
    assert calls == ["teacher", "kd-s0", "nokd-s0"]
    record = json.loads((tmp_path / "logs/experiment/stages.json").read_text())
    assert "argv" in record["kd-s0"] and "argv" not in record["nokd-s0"]  # a failed stage is not marked done
    calls.clear()
    said = []
    minutes = runner.run_stages(cfg, study_plan.plan(cfg), runner=fake_runner(calls), say=said.append)
    assert calls == ["nokd-s0", "kd-tweets-s0"]
    assert sum("skipped" in line for line in said) == 2 and set(minutes) >= {"teacher", "kd-s0", "kd-tweets-s0"}
    assert minutes == runner.recorded_minutes(cfg)
    calls.clear()
    runner.run_stages(cfg, study_plan.plan(cfg), runner=fake_runner(calls), **quiet)
    assert calls == []
    changed = load(few + ["pretrain_overrides=[train.max_steps=5]"])
    with pytest.raises(KDError, match=r"stage teacher already finished with other settings \((.*; )?"
                                      r"train.eval_batches: 1000 -> 8(.|\n)*delete logs/experiment/teacher and "
                                      r"checkpoints/experiment/teacher "):
        runner.run_stages(changed, study_plan.plan(changed), runner=fake_runner(calls), **quiet)
    fewer = load(few + ["nproc=1"])
    with pytest.raises(KDError, match="nproc: 2 -> 1"):
        runner.run_stages(fewer, study_plan.plan(fewer), runner=fake_runner(calls), **quiet)
    # an edited preset counts too, not only the command line
    preset = tmp_path / "kd_preset.yaml"
    preset.write_text((Path(ROOT) / "configs" / "demo.yaml").read_text())
    edited = load(few + [f"pretrain.kd.config={preset}"])
    runner.run_stages(edited, study_plan.plan(edited)[:2], runner=fake_runner(calls), **quiet)
    preset.write_text(preset.read_text().replace("temperature: 2.0", "temperature: 3.0"))
    with pytest.raises(KDError, match="loss.temperature: 2.0 -> 3.0"):
        runner.run_stages(edited, study_plan.plan(edited)[:2], runner=fake_runner(calls), **quiet)
    assert calls == []


def test_a_key_added_to_the_schema_later_does_not_invalidate_finished_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(Path(ROOT) / "configs")
    path = tmp_path / "one.yaml"
    path.write_text("pretrain:\n  teacher: {config: configs/demo_teacher.yaml}\n")
    cfg = load_experiment(str(path), [])
    stages = study_plan.plan(cfg)
    runner.run_stages(cfg, stages, runner=fake_runner([]), say=lambda *_: None)
    saved = stages[0].log_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("  split_seed: 0\n", ""))  # written before data.split_seed existed
    assert "split_seed" not in saved.read_text()
    runner.StageRecord(tmp_path / "logs/experiment/stages.json").check_unchanged(stages[0])


def test_noise_rule_against_hand_computed_values():
    a, b = {"0": 5.00, "1": 5.04, "2": 4.99}, {"0": 5.10, "1": 5.11, "2": 5.12}
    pooled = ((statistics.variance(a.values()) + statistics.variance(b.values())) / 2) ** 0.5
    verdict = stats.judge(a, b, lower_is_better=True, std_multiple=2.0, paired_alpha=0.05)
    assert verdict["gain"] == pytest.approx(5.11 - statistics.fmean(a.values()))
    assert verdict["pooled_std"] == pytest.approx(pooled) and verdict["threshold"] == pytest.approx(2 * pooled)
    diffs = [a[s] - b[s] for s in "012"]  # t = mean(d) / (sd(d) / sqrt(n)), df 2
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / 3 ** 0.5)
    from scipy.stats import t as student_t
    assert verdict["paired_p"] == pytest.approx(2 * student_t.sf(abs(t), 2))
    assert verdict["verdict"] == "a wins"
    close = stats.judge({"0": 83.5, "1": 83.9, "2": 83.1}, {"0": 83.2, "1": 83.6, "2": 83.2}, False, 2.0, 0.05)
    assert close["verdict"] == "within noise" and close["gain"] == pytest.approx(1 / 6)
    worse = stats.judge({"0": 80.0, "1": 80.1}, {"0": 83.0, "1": 83.2}, False, 2.0, 0.05)
    assert worse["verdict"] == "b wins" and worse["gain"] < 0
    assert stats.paired_p({"0": 1.0, "1": 2.0}, {"0": 0.0, "1": 1.0}) is None  # constant difference: undefined


def test_tiny_study_end_to_end(tmp_path, tiny_teacher_dir, corpus_file, shared_cache):
    """Real runs of a tiny study: summary.json, results.md and the figures agree with the logs."""
    study = tmp_path / "study.yaml"
    pretrain = ["data.source=text", f"data.train_files=[{corpus_file}]", "data.validation_fraction=0.2",
                "data.seq_len=64", f"data.cache_dir={shared_cache}", "train.max_steps=4", "train.batch_size=4",
                "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=2", "train.save_every=2",
                "train.log_every=1", "student.num_layers=2"]
    finetune = ["data.source=pang-lee", "train.max_steps=4", "train.batch_size=8", "train.eval_every=2",
                "data.group_by_length=true"]
    study.write_text(json.dumps({
        "name": "tiny", "nproc": 1, "finetune_nproc": 1, "log_dir": str(tmp_path / "logs"),
        "checkpoint_dir": str(tmp_path / "ckpt"), "plots_dir": str(tmp_path / "plots"), "pretrain_overrides": pretrain,
        "pretrain": {
            "teacher": {"config": f"{ROOT}/configs/demo_teacher.yaml",
                        "overrides": [f"student.init=pretrained:{tiny_teacher_dir}", "student.num_layers=4",
                                      "train.export_steps=[2]"]},
            "kd": {"config": f"{ROOT}/configs/demo.yaml", "teacher": "teacher", "seeds": [0, 1]},
            "nokd": {"config": f"{ROOT}/configs/demo.yaml", "teacher": "teacher", "seeds": [0, 1],
                     "overrides": ["loss.alpha_kd=0", "loss.alpha_hidden=0"]},
        },
        "finetune": {"config": f"{ROOT}/configs/finetune_tweets.yaml", "overrides": finetune,
                     "runs": {"teacher": {"model": "teacher", "seeds": [0]}, "kd": {"model": "kd"},
                              "kd-taskkd": {"model": "kd", "task_teacher": "teacher-tweets-s0"}}},
        "comparisons": [{"a": "kd", "b": "nokd", "metric": "heldout_mlm_loss"},
                        {"a": "kd-taskkd", "b": "kd", "metric": "test_accuracy"}],
        "dose_response": [{"teacher": "teacher@2", "kd": "kd", "nokd": "nokd"}],
        "equal_compute": {"nokd": "nokd-s0", "kd_masked": "kd-s0"},
        "two_by_two": {"both": "kd-taskkd", "pretrain_kd_only": "kd", "teacher": "teacher"},
    }))
    result = run_script([PY, "experiment.py", "--config", str(study), "--no-latency"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    logs, ckpt = tmp_path / "logs" / "tiny", tmp_path / "ckpt" / "tiny"
    assert (ckpt / "teacher" / "export_step_000002" / "config.json").is_file()
    summary = json.loads((logs / "summary.json").read_text())
    kd_rows = [r for r in summary["pretraining"] if r["group"] == "kd"]
    assert [r["run"] for r in kd_rows] == ["kd-s0", "kd-s1"] and [r["train_seed"] for r in kd_rows] == [0, 1]
    for row in kd_rows:
        last = [json.loads(line) for line in (logs / row["run"] / "metrics.jsonl").read_text().splitlines()
                if "eval/mlm_ce" in line][-1]
        assert row["heldout_mlm_loss"] == last["eval/mlm_ce"] and row["step"] == 4
    kd_group = next(g for g in summary["pretraining_groups"] if g["group"] == "kd")
    assert kd_group["heldout_mlm_loss"]["mean"] == pytest.approx(statistics.fmean(r["heldout_mlm_loss"] for r in kd_rows))
    accs = {s: json.loads((logs / f"kd-taskkd-tweets-s{s}" / "results.json").read_text()) for s in (0, 1)}
    assert all(a["task_teacher"].endswith("teacher-tweets-s0/final") for a in accs.values())
    group = next(g for g in summary["finetune_groups"] if g["group"] == "kd-taskkd")
    assert group["test_accuracy_pct"]["per_seed"] == {str(s): a["test"]["accuracy"] for s, a in accs.items()}
    assert set(group["validation_curve"]) == {"2", "4"}
    comparison = summary["comparisons"][0]
    nokd_group = next(g for g in summary["pretraining_groups"] if g["group"] == "nokd")
    assert comparison["gain"] == pytest.approx(nokd_group["heldout_mlm_loss"]["mean"] - kd_group["heldout_mlm_loss"]["mean"])
    dose = summary["dose_response"][0]
    teacher_at_2 = [json.loads(line)["eval/mlm_ce"] for line in (logs / "teacher" / "metrics.jsonl").read_text().splitlines()
                    if '"eval/mlm_ce"' in line and json.loads(line)["step"] == 2][0]
    assert dose["teacher_loss"] == teacher_at_2
    assert dose["kd_gain"]["n"] == 2 and set(summary["two_by_two"]) == {"both", "pretrain_kd_only", "teacher"}
    ec = summary["equal_compute"]["runs"]
    assert ec["kd_masked"]["flops_per_step"] > ec["nokd"]["flops_per_step"] > 0  # the teacher forward costs
    assert ec["nokd"]["seconds_per_step"] > 0 and ec["nokd"]["curve"][-1][0] == 4
    from kd.study.render import render_markdown
    assert (logs / "results.md").read_text() == render_markdown(summary)
    for figure in ("study.png", "dose_response.png", "equal_compute.png", "finetune_curves.png"):
        assert (tmp_path / "plots" / "tiny" / figure).stat().st_size > 0
    again = run_script([PY, "experiment.py", "--config", str(study), "--no-latency", "--no-timing"])
    assert again.returncode == 0 and again.stdout.count("skipped") == 10


@pytest.mark.parametrize("study", ["experiment", "narrow"])
def test_readme_results_match_the_committed_summary(study):
    """Each study's README tables are render_markdown(docs/<study>/summary.json), verbatim, between
    that study's markers."""
    from kd.study.publish import readme_markers
    from kd.study.render import render_markdown
    summary = json.loads((Path(ROOT) / "docs" / study / "summary.json").read_text())
    readme = (Path(ROOT) / "README.md").read_text()
    begin, end = readme_markers(study)
    assert readme.split(begin)[1].split(end)[0] == "\n" + render_markdown(summary)


def test_an_interrupted_stage_keeps_its_minutes_and_is_not_marked_done(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(Path(ROOT) / "configs")
    cfg = load_experiment(str(small_study(tmp_path)), [])
    calls = []
    inner = fake_runner(calls)

    def stopped_at_kd(stage, out_path):
        if stage.run == "kd-s0":
            time.sleep(0.4)  # minutes are kept to 0.01
            raise SystemExit(143)  # what run_subprocess raises when SIGTERM is forwarded
        return inner(stage, out_path)
    with pytest.raises(SystemExit):
        runner.run_stages(cfg, study_plan.plan(cfg), runner=stopped_at_kd, say=lambda *_: None)
    record = json.loads((tmp_path / "logs/experiment/stages.json").read_text())
    assert record["kd-s0"]["minutes"] > 0 and "argv" not in record["kd-s0"]
    before = record["kd-s0"]["minutes"]
    runner.run_stages(cfg, study_plan.plan(cfg), runner=fake_runner(calls), say=lambda *_: None)
    record = json.loads((tmp_path / "logs/experiment/stages.json").read_text())
    assert record["kd-s0"]["minutes"] >= before and "argv" in record["kd-s0"]  # the resumed run adds to it


def test_publish_writes_between_its_own_studys_markers_only(tmp_path):
    from types import SimpleNamespace

    from kd.study.publish import publish
    from kd.study.render import render_markdown
    summary = json.loads((Path(ROOT) / "docs" / "narrow" / "summary.json").read_text())
    cfg = SimpleNamespace(name="narrow", log_dir=str(tmp_path / "logs"), plots_dir=str(tmp_path / "plots"))
    (tmp_path / "logs" / "narrow").mkdir(parents=True)
    (tmp_path / "logs" / "narrow" / "summary.json").write_text(json.dumps(summary))
    readme = tmp_path / "README.md"
    other = "<!-- experiment-results:begin -->\nheadline\n<!-- experiment-results:end -->\n"
    readme.write_text(other + "text\n")
    with pytest.raises(KDError, match="narrow-results:begin"):
        publish(cfg, readme, tmp_path / "docs")
    readme.write_text(other + "<!-- narrow-results:begin -->\nold\n<!-- narrow-results:end -->\ntail\n")
    publish(cfg, readme, tmp_path / "docs")
    assert readme.read_text() == (other + "<!-- narrow-results:begin -->\n" + render_markdown(summary)
                                  + "<!-- narrow-results:end -->\ntail\n")
    assert (tmp_path / "docs" / "summary.json").is_file()
