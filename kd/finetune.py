"""Fine-tuning on a task (GLUE-style classification or SQuAD), optionally with task-level KD.

It reuses the pretraining engine: the task supplies a model, a loss function, a loader and an
evaluation callback; DDP, AMP, logging, checkpoints and resume come from `kd.engine`.
"""
from collections import Counter
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch.utils.data import Subset
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from kd import dist
from kd.checkpoint import Checkpointer, export_dir_for, export_pretrained
from kd.config import TrainConfig, to_dict, to_yaml
from kd.config_checks import check_choice, validate_train
from kd.data.loader import make_loader
from kd.engine import Trainer
from kd.optim import autocast_for
from kd.errors import KDError
from kd.integrity import run_identity
from kd.logger import setup_console_logging, write_json, write_run_files
from kd.losses import kl_div_logits
from kd.models import count_parameters, load_pretrained, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class FinetuneDataConfig:
    source: str = "hub"                 # hub | files | tweets | pang-lee (classification); hub | files (squad)
    train: Optional[str] = None         # local files for source=files
    validation: Optional[str] = None
    test: Optional[str] = None
    text_columns: Optional[List[str]] = None
    label_column: Optional[str] = None
    on_bad_row: str = "error"           # error | skip (counted and reported)
    split_seed: int = 0                 # fixed split of the packaged sets (tweets, pang-lee)
    max_length: int = 128               # 384 for SQuAD
    doc_stride: int = 128               # SQuAD windows
    max_answer_length: int = 30
    n_best: int = 20
    group_by_length: bool = False       # classification: batches of similar lengths (less padding)


@dataclass
class TaskDistillConfig:
    """Task-level KD from a fine-tuned teacher; off while teacher is null."""
    teacher: Optional[str] = None
    alpha_kd: float = 1.0
    alpha_ce: float = 1.0
    temperature: float = 2.0


@dataclass
class FinetuneConfig:
    run_name: str = MISSING
    model: str = MISSING                # hub name, local HF folder, or packaged-minilm
    task: str = "sst2"                  # a preset of kd.data.tasks.TASKS, or squad
    log_dir: str = "logs"
    checkpoint_dir: str = "checkpoints"
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    distill: TaskDistillConfig = field(default_factory=TaskDistillConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=100000, epochs=3, batch_size=32, lr=5e-5, warmup_steps=0, eval_every=0,
        eval_every_epoch=True, save_every=0, keep_last=1, log_every=20, eval_batches=100000))


def validate_finetune(cfg) -> None:
    validate_train(cfg.train)
    check_choice(cfg.data.on_bad_row, ["error", "skip"], "data.on_bad_row")
    given = [k for k in ("train", "validation", "test") if getattr(cfg.data, k)]
    if given and cfg.data.source != "files":
        raise KDError(f"data.{given[0]}={getattr(cfg.data, given[0])} is set, but data.source={cfg.data.source} "
                      f"does not read local files, so it would be ignored: add data.source=files to use your "
                      f"files, or unset data.{given[0]}")
    if cfg.data.group_by_length and cfg.task == "squad":
        raise KDError("data.group_by_length applies to classification; SQuAD windows all have "
                      "data.max_length tokens. Unset it for task=squad.")
    if cfg.distill.teacher and cfg.distill.temperature <= 0:
        raise KDError("distill.temperature must be > 0")


def _load_model(cls, ref: str, what: str, **kwargs):
    model = load_pretrained(cls, ref, what, attn_implementation="sdpa", **kwargs)
    return model.float()


# ---- classification -------------------------------------------------------------------------
class ClassificationTask:
    def __init__(self, cfg, tokenizer, info):
        from kd.data.classification import ClassificationDataset, PadCollate, load_classification_splits
        d = cfg.data
        self.data = load_classification_splits(d.source, cfg.task, d.train, d.validation, d.test,
                                               seed=d.split_seed, on_bad_row=d.on_bad_row,
                                               text_columns=d.text_columns, label_column=d.label_column)
        self.data.require("train", "validation")
        if info.is_main:  # every rank reads the same rows: say it once
            for note in self.data.notes:
                log.warning("%s", note)
            if self.data.total_skipped:
                log.warning("skipped %d bad row(s): %s", self.data.total_skipped, self.data.skipped)
        self.sets = {name: ClassificationDataset(rows, tokenizer, d.max_length)
                     for name, rows in self.data.splits.items() if rows}
        self.collate = PadCollate(tokenizer.pad_token_id)
        self.num_labels = self.data.task.num_labels
        self.task_name = cfg.task if d.source in ("hub", "files") else f"sentiment-{d.source}"
        if d.source == "pang-lee":
            self.task_name = "pang-lee"

    def majority_class_pct(self) -> Dict[str, float]:
        """Accuracy of always answering the train split's most common label: the floor to beat."""
        majority = Counter(r.label for r in self.data.splits["train"]).most_common(1)[0][0]
        return {name: 100.0 * sum(r.label == majority for r in rows) / len(rows)
                for name, rows in self.data.splits.items() if rows}

    def build_model(self, ref: str, what: str):
        return _load_model(AutoModelForSequenceClassification, ref, what, num_labels=self.num_labels)

    @staticmethod
    def logits(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits

    def loss(self, model, teacher, batch, kd_cfg):
        logits = self.logits(model, batch)
        terms = {"ce": F.cross_entropy(logits.float(), batch["labels"])}
        if teacher is None:
            return terms["ce"], terms
        with torch.no_grad():
            t_logits = self.logits(teacher, batch)
        terms["kd_kl"] = kl_div_logits(logits, t_logits, kd_cfg.temperature)
        return kd_cfg.alpha_ce * terms["ce"] + kd_cfg.alpha_kd * terms["kd_kl"], terms

    @torch.no_grad()
    def evaluate(self, model, split, info, autocast, batch_size, max_batches=None) -> Dict[str, float]:
        """Each rank scores a disjoint shard (no padding duplicates); sums are all-reduced.
        `max_batches` (train.eval_batches) caps each rank's share, for quick demos; the number of
        examples actually scored is reported with the metric."""
        dataset = self.sets[split]
        rows = list(range(info.rank, len(dataset), info.world_size))
        if max_batches is not None:
            rows = rows[:max_batches * batch_size]
        # The same examples, longest first: batches pad to similar lengths (~2x faster on the tweets);
        # the sums below do not depend on the order.
        rows.sort(key=lambda i: -len(dataset.input_ids[i]))
        loader = torch.utils.data.DataLoader(Subset(dataset, rows), batch_size=batch_size, collate_fn=self.collate)
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss, correct, n
        model.eval()
        for batch in loader:
            batch = {k: v.to(info.device) for k, v in batch.items()}
            with autocast():
                logits = self.logits(model, batch)
            sums[0] += F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
            sums[1] += (logits.argmax(-1) == batch["labels"]).sum()
            sums[2] += len(batch["labels"])
        model.train()
        sums = dist.all_reduce_sum(sums)
        n = max(float(sums[2]), 1.0)
        return {"loss": float(sums[0]) / n, "accuracy": 100.0 * float(sums[1]) / n, "examples": int(sums[2])}


# ---- SQuAD ----------------------------------------------------------------------------------
class SquadTask:
    task_name = "squad"

    def __init__(self, cfg, tokenizer, info):
        from kd.data.squad import TensorDictDataset, prepare_eval_features, prepare_train_features
        from kd.data.squad_examples import load_squad
        d = cfg.data
        self.cfg = d
        self.data = load_squad(d.source, d.train, d.validation, on_bad_row=d.on_bad_row)
        if self.data.splits.get("train") is None or self.data.splits.get("validation") is None:
            raise KDError("SQuAD fine-tuning needs a train and a validation split: data.train=PATH "
                          "data.validation=PATH (SQuAD v1.1 JSON)")
        for note in self.data.notes if info.is_main else []:  # every rank reads the same rows: say it once
            log.warning("%s", note)
        train = prepare_train_features(self.data.splits["train"], tokenizer, d.max_length, d.doc_stride)
        train.pop("example_index", None)
        self.sets = {"train": TensorDictDataset(train)}
        self.eval_features = prepare_eval_features(self.data.splits["validation"], tokenizer,
                                                   d.max_length, d.doc_stride)
        self.collate = None

    def build_model(self, ref: str, what: str):
        return _load_model(AutoModelForQuestionAnswering, ref, what)

    @staticmethod
    def logits(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"])
        return out.start_logits, out.end_logits

    def loss(self, model, teacher, batch, kd_cfg):
        start, end = self.logits(model, batch)
        ce = (F.cross_entropy(start.float(), batch["start_positions"]) +
              F.cross_entropy(end.float(), batch["end_positions"])) / 2
        terms = {"ce": ce}
        if teacher is None:
            return ce, terms
        with torch.no_grad():
            t_start, t_end = self.logits(teacher, batch)
        mask = batch["attention_mask"].bool()
        # DistilBERT's QA recipe: T^2 * (KL_start + KL_end) / 2; padding gets -inf on both sides
        s_start, s_end = (x.float().masked_fill(~mask, -1e4) for x in (start, end))
        t_start, t_end = (x.float().masked_fill(~mask, -1e4) for x in (t_start, t_end))
        terms["kd_kl"] = (kl_div_logits(s_start, t_start, kd_cfg.temperature) +
                          kl_div_logits(s_end, t_end, kd_cfg.temperature)) / 2
        return kd_cfg.alpha_ce * ce + kd_cfg.alpha_kd * terms["kd_kl"], terms

    @torch.no_grad()
    def evaluate(self, model, split, info, autocast, batch_size, max_batches=None) -> Dict[str, float]:
        from kd.data.squad import postprocess_predictions
        from kd.data.squad_examples import squad_references
        from kd.metrics import squad_metrics
        features = self.eval_features
        rows = list(range(info.rank, len(features), info.world_size))
        starts, ends = [], []
        model.eval()
        for i in range(0, len(rows), batch_size):
            index = torch.tensor(rows[i:i + batch_size])
            batch = {k: v[index].to(info.device) for k, v in features.tensors.items()}
            with autocast():
                s, e = self.logits(model, batch)
            starts.append(s.float().cpu())
            ends.append(e.float().cpu())
        model.train()
        local = (rows, torch.cat(starts) if starts else None, torch.cat(ends) if ends else None)
        gathered = [local]
        if torch.distributed.is_initialized():
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, local)
        order, start_logits, end_logits = [], [], []
        for r, s, e in gathered:
            if s is not None:
                order += r
                start_logits.append(s)
                end_logits.append(e)
        perm = torch.argsort(torch.tensor(order))
        start_all, end_all = torch.cat(start_logits)[perm], torch.cat(end_logits)[perm]
        examples = self.data.splits["validation"]
        predictions = postprocess_predictions(examples, features, start_all, end_all,
                                              n_best=self.cfg.n_best,
                                              max_answer_length=self.cfg.max_answer_length)
        return squad_metrics(predictions, squad_references(examples))


# ---- the run --------------------------------------------------------------------------------
def run_finetuning(cfg) -> dict:
    validate_finetune(cfg)
    return dist.run_in_process_group(cfg.train.device, lambda info: _run(cfg, info))


def _run(cfg, info) -> dict:
    setup_console_logging()
    started = time.time()
    torch.manual_seed(cfg.train.seed + info.rank)
    log_dir = os.path.join(cfg.log_dir, cfg.run_name)
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.run_name)
    tokenizer = load_tokenizer(cfg.model)
    task = (SquadTask if cfg.task == "squad" else ClassificationTask)(cfg, tokenizer, info)
    model = task.build_model(cfg.model, "model")
    teacher = None
    if cfg.distill.teacher:
        teacher = task.build_model(cfg.distill.teacher, "task teacher").to(info.device).eval()
        teacher.requires_grad_(False)
    sizes = dict(task.data.split_sizes)
    if cfg.task == "squad":
        sizes["train_windows"] = len(task.sets["train"])
    log.info("fine-tuning %s on %s: %s; %.1fM parameters", cfg.model, task.task_name, sizes,
             count_parameters(model) / 1e6)
    lengths = [len(ids) for ids in task.sets["train"].input_ids] if cfg.data.group_by_length else None
    loader = make_loader(task.sets["train"], cfg.train.batch_size, task.collate, info.rank,
                         info.world_size, cfg.train.seed, num_workers=cfg.train.num_workers, lengths=lengths)
    autocast = autocast_for(info.device, cfg.train.amp)

    def eval_fn(wrapped):
        metrics = task.evaluate(wrapped, "validation", info, autocast, cfg.train.batch_size,
                                cfg.train.eval_batches)
        return {f"eval/{k}": v for k, v in metrics.items()}

    export_dir = export_dir_for(run_dir)

    def export_fn(trained, tag=None):
        out = export_dir_for(run_dir, tag)
        export_pretrained(trained, tokenizer, out)
        log.info("exported fine-tuned model to %s", out)

    checkpointer = Checkpointer(run_dir, cfg.train.keep_last,
                                {"model": cfg.model, "task": cfg.task, "data": to_dict(cfg.data)},
                                run_identity(to_dict(cfg)))
    trainer = Trainer(cfg.train, info, model, lambda m, b: task.loss(m, teacher, b, cfg.distill),
                      loader, checkpointer, log_dir, eval_fn=eval_fn, export_fn=export_fn)
    if info.is_main:
        write_run_files(log_dir, to_yaml(cfg), {
            "kind": "finetune", "run_name": cfg.run_name, "task": task.task_name, "model": cfg.model,
            "num_parameters": count_parameters(model), "device": str(info.device),
            "world_size": info.world_size, "export_dir": export_dir})
    trainer.maybe_resume()
    val_metrics = trainer.fit()
    results = {"validation": {k.split("/", 1)[1]: v for k, v in val_metrics.items()}}
    if "test" in task.sets:  # the packaged sets have a held-out test split: report it as the metric
        results["test"] = task.evaluate(trainer.wrapped, "test", info, autocast, cfg.train.batch_size,
                                        cfg.train.eval_batches)
    scored = results.get("test", results["validation"])
    metrics = {k: v for k, v in scored.items() if k not in ("loss", "examples")}
    payload = {"task": task.task_name, "model": cfg.model, "run_name": cfg.run_name,
               "num_parameters": count_parameters(model), "metrics": metrics,
               "metrics_split": "test" if "test" in task.sets else "validation",
               "metrics_examples": scored.get("examples"), **results,
               "split_sizes": sizes, "split_seed": cfg.data.split_seed, "seed": cfg.train.seed,
               "skipped_rows": task.data.skipped, "task_teacher": cfg.distill.teacher,
               "wall_time_s": round(time.time() - started, 1), "device": str(info.device),
               "world_size": info.world_size}
    if isinstance(task, ClassificationTask):
        payload["majority_class_pct"] = task.majority_class_pct()
    if info.is_main:
        write_json(os.path.join(log_dir, "results.json"), payload)
        log.info("results: %s -> %s", ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()),
                 os.path.join(log_dir, "results.json"))
    return payload
