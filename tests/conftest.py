"""Shared fixtures: a tiny BERT teacher with the real uncased vocab, and a slice of real Wikipedia."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def tiny_bert_config(layers: int = 4, hidden: int = 64, heads: int = 2):
    from transformers import BertConfig
    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=2 * hidden,
                      max_position_embeddings=128)


@pytest.fixture(scope="session")
def tokenizer_dir():
    from kd.assets import minilm_path
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised 4x64 BertForMaskedLM (with an MLM head) and the real vocab."""
    from transformers import AutoTokenizer, BertForMaskedLM
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_teacher")
    BertForMaskedLM(tiny_bert_config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """Twelve real Wikipedia articles from the gensim sample, one document per paragraph block."""
    from kd.data.corpus import wiki_sample_articles
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "wiki.txt"
    path.write_text("\n\n".join(wiki_sample_articles()[:12]), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny_overrides(tmp_path, teacher_dir, corpus, cache, run_name="tiny", steps=6, **extra):
    """Overrides for a seconds-long pretraining run on the tiny teacher."""
    items = {
        "run_name": run_name, "log_dir": str(tmp_path / "logs"), "checkpoint_dir": str(tmp_path / "ckpt"),
        "teacher.name": teacher_dir, "student.num_layers": 2, "data.source": "text",
        "data.train_files": f"[{corpus}]", "data.validation_fraction": 0.2, "data.seq_len": 64,
        "data.cache_dir": cache, "train.max_steps": steps, "train.batch_size": 4, "train.lr": 1e-3,
        "train.warmup_steps": 1, "train.eval_every": 3, "train.eval_batches": 2, "train.save_every": 3,
        "train.log_every": 1,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def run_script(args, env_extra=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
