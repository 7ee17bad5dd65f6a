"""Fine-tuning through the shared engine: overfitting a handful of real rows, DDP, SQuAD files."""
import contextlib
import json

import pytest
import torch

from kd.config import load_config
from kd.finetune import FinetuneConfig, run_finetuning
from tests.conftest import TORCHRUN, run_script


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory):
    """Eight real Pang & Lee sentences (4 pos, 4 neg) as an SST-2 style TSV."""
    from kd.data.classification import load_classification_splits
    data = load_classification_splits("pang-lee", "sst2", seed=0)
    rows = data.splits["train"]
    pos = [r for r in rows if r.label == 1][:4]
    neg = [r for r in rows if r.label == 0][:4]
    folder = tmp_path_factory.mktemp("sentiment")
    path = folder / "rows.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{r.text}\t{r.label}\n" for r in pos + neg))
    return str(path)


def overrides(tmp_path, model_dir, train_file, run_name, steps, **extra):
    items = {"run_name": run_name, "model": model_dir, "task": "sst2", "log_dir": str(tmp_path / "logs"),
             "checkpoint_dir": str(tmp_path / "ckpt"), "data.source": "files", "data.train": train_file,
             "data.validation": train_file, "data.max_length": 48, "train.epochs": "null",
             "train.max_steps": steps, "train.batch_size": 4, "train.lr": 2e-3, "train.warmup_steps": 0,
             "train.log_every": 1, "train.eval_every_epoch": False, "train.eval_every": steps}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def test_tiny_model_overfits_a_handful_of_rows(tmp_path, tiny_teacher_dir, sentiment_files):
    cfg = load_config(FinetuneConfig, None, overrides(tmp_path, tiny_teacher_dir, sentiment_files, "overfit", 40))
    results = run_finetuning(cfg)
    assert results["metrics"]["accuracy"] == pytest.approx(100.0)
    assert results["split_sizes"] == {"train": 8, "validation": 8}
    records = [json.loads(l) for l in open(tmp_path / "logs" / "overfit" / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    saved = json.loads((tmp_path / "logs" / "overfit" / "results.json").read_text())
    assert saved["task"] == "sst2" and saved["num_parameters"] > 0 and saved["wall_time_s"] > 0
    assert saved["majority_class_pct"] == {"train": 50.0, "validation": 50.0}  # 4 positive, 4 negative rows
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "overfit" / "final")
    assert model.config.num_labels == 2


def test_task_distillation_logs_kd_term(tmp_path, tiny_teacher_dir, sentiment_files):
    cfg = load_config(FinetuneConfig, None, overrides(
        tmp_path, tiny_teacher_dir, sentiment_files, "taskkd", 2, **{"distill.teacher": tiny_teacher_dir}))
    run_finetuning(cfg)
    records = [json.loads(l) for l in open(tmp_path / "logs" / "taskkd" / "metrics.jsonl")]
    assert all("train/kd_kl" in r and "train/ce" in r for r in records if "train/loss" in r)


def test_two_process_fine_tune_agrees_with_single_process_eval(tmp_path, tiny_teacher_dir, sentiment_files):
    result = run_script([TORCHRUN, "--standalone", "--nproc_per_node=2", "finetuneit.py",
                         *overrides(tmp_path, tiny_teacher_dir, sentiment_files, "ddpft", 3,
                                    **{"train.batch_size": 2})])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "logs" / "ddpft" / "results.json").read_text())
    assert saved["world_size"] == 2 and saved["metrics_examples"] == 8  # shards cover every row once
    # the all-reduced accuracy equals a single-process evaluation of the exported model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from kd.data.classification import encode, load_classification_splits
    final = tmp_path / "ckpt" / "ddpft" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    data = load_classification_splits("files", "sst2", train_file=sentiment_files, validation_file=sentiment_files)
    batch = encode(data.splits["validation"], AutoTokenizer.from_pretrained(final), 48)
    labels = batch.pop("labels")
    with torch.no_grad():
        accuracy = 100.0 * (model(**batch).logits.argmax(-1) == labels).float().mean().item()
    assert saved["metrics"]["accuracy"] == pytest.approx(accuracy)


def squad_file(path, contexts):
    data = []
    for i, (context, answer) in enumerate(contexts):
        start = context.index(answer)
        data.append({"title": f"t{i}", "paragraphs": [{"context": context, "qas": [
            {"id": f"q{i}", "question": f"What is mentioned about {answer.split()[0]}?",
             "answers": [{"text": answer, "answer_start": start}]}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return str(path)


def test_squad_fine_tune_on_local_files_reports_em_f1(tmp_path, tiny_teacher_dir):
    from kd.data.corpus import wiki_sample_articles
    articles = [a for a in wiki_sample_articles() if len(a) > 2000][:3]
    contexts = [(a[:1500], " ".join(a[900:1500].split()[1:5])) for a in articles]
    path = squad_file(tmp_path / "squad.json", contexts)
    cfg = load_config(FinetuneConfig, None, [
        "run_name=squad", f"model={tiny_teacher_dir}", "task=squad", f"log_dir={tmp_path / 'logs'}",
        f"checkpoint_dir={tmp_path / 'ckpt'}", "data.source=files", f"data.train={path}",
        f"data.validation={path}", "data.max_length=128", "data.doc_stride=32", "train.max_steps=2",
        "train.epochs=null", "train.batch_size=4", "train.log_every=1"])
    results = run_finetuning(cfg)
    assert set(results["metrics"]) == {"exact_match", "f1"}
    assert 0.0 <= results["metrics"]["f1"] <= 100.0
    assert results["split_sizes"]["train_windows"] > 3  # 1500-char contexts need several windows


def test_length_sorted_eval_scores_the_same_examples_as_dataset_order(tiny_teacher_dir, sentiment_files, tmp_path):
    """evaluate() batches longest-first for speed; with and without an eval_batches cap it must score
    exactly the rows a plain in-order pass would (the first max_batches * batch_size of the shard)."""
    import torch.nn.functional as F

    from kd.dist import DistInfo
    from kd.finetune import ClassificationTask
    from kd.models import load_tokenizer
    cfg = load_config(FinetuneConfig, None, overrides(tmp_path, tiny_teacher_dir, sentiment_files, "ev", 1))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    task = ClassificationTask(cfg, load_tokenizer(tiny_teacher_dir), info)
    torch.manual_seed(0)
    model = task.build_model(tiny_teacher_dir, "model").eval()
    dataset = task.sets["validation"]
    lengths = [len(ids) for ids in dataset.input_ids]
    assert lengths != sorted(lengths, reverse=True)  # the sort has something to do

    def in_order(rows):
        batch = task.collate([dataset[i] for i in rows])
        model.eval()  # evaluate() leaves the model in train mode
        with torch.no_grad():
            logits = task.logits(model, batch)
        return {"loss": F.cross_entropy(logits, batch["labels"]).item(),
                "accuracy": 100.0 * (logits.argmax(-1) == batch["labels"]).float().mean().item(),
                "examples": len(rows)}

    for max_batches, expected_rows in ((None, range(8)), (1, range(3))):
        got = task.evaluate(model, "validation", info, contextlib.nullcontext, 3, max_batches)
        want = in_order(list(expected_rows))
        assert got["examples"] == want["examples"]
        assert got["accuracy"] == pytest.approx(want["accuracy"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_given_files_with_a_hub_source_are_refused_with_the_fix():
    from kd.errors import KDError
    from kd.finetune import validate_finetune
    cfg = load_config(FinetuneConfig, "configs/finetune_squad.yaml",
                      ["model=m", "data.train=my.json", "data.validation=my.json"])
    with pytest.raises(KDError, match=r"data.train=my.json is set, but data.source=hub does not read local files, "
                                      r"so it would be ignored: add data.source=files"):
        validate_finetune(cfg)
    validate_finetune(load_config(FinetuneConfig, "configs/finetune_squad.yaml",
                                  ["model=m", "data.source=files", "data.train=my.json", "data.validation=my.json"]))
