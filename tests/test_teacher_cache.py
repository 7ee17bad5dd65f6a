"""Offline teacher cache: exact storage, KL equal to the live teacher's top-k KL, alignment of masks
and rows, manifest and checksum refusals, resumable (and DDP-split) generation, training without a
teacher in memory, and the benchmark's output format."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.config import PretrainConfig, load_config
from kd.config_checks import validate_pretrain
from kd.data.blocks import load_blocks
from kd.data.masking import mask_batch, masking_spec_for
from kd.errors import KDError
from kd.losses import kl_div_logits, topk_kl
from kd.models import load_teacher, load_tokenizer, mlm_forward
from kd.teacher_cache.format import SHARDS, row_dtype, teacher_weights_sha256
from kd.teacher_cache.generate import _write_shard, run_cache_generation, teacher_topk
from kd.teacher_cache.read import CachedTeacherCollate, TeacherCache
from tests.conftest import PY, TORCHRUN, run_script, tiny_bert_config, tiny_overrides

TOPK, SHARD_BLOCKS = 16, 32


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Four real Wikipedia articles: ~250 blocks of 64 tokens, enough for several shards."""
    from kd.data.corpus import wiki_sample_articles
    path = tmp_path_factory.mktemp("tc_corpus") / "wiki.txt"
    path.write_text("\n\n".join(wiki_sample_articles()[:4]), encoding="utf-8")
    return str(path)


def cache_overrides(tmp_path, teacher_dir, corpus, blocks_cache, cache_path, **extra):
    items = {"teacher_cache.path": str(cache_path), "teacher_cache.epochs": 2, "teacher_cache.topk": TOPK,
             "teacher_cache.shard_blocks": SHARD_BLOCKS, "teacher_cache.batch_size": 64,
             "loss.alpha_hidden": 0, "loss.temperature": 2.0}
    items.update(extra)
    return tiny_overrides(tmp_path, teacher_dir, corpus, blocks_cache, **items)


def make_cfg(*args, **extra):
    return load_config(PretrainConfig, None, cache_overrides(*args, **extra))


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_teacher_dir, small_corpus, shared_cache):
    """One cache (2 mask draws) shared by the read-only tests."""
    root = tmp_path_factory.mktemp("tc_made")
    cfg = make_cfg(root, tiny_teacher_dir, small_corpus, shared_cache, root / "tcache")
    summary = run_cache_generation(cfg)
    tokenizer = load_tokenizer(tiny_teacher_dir)
    train, val = load_blocks(cfg.data, tokenizer, cfg.data.split_seed)
    return {"cfg": cfg, "root": root, "path": str(root / "tcache"), "summary": summary, "tokenizer": tokenizer,
            "train": train, "val": val, "teacher": load_teacher(cfg.teacher, torch.device("cpu"))}


def test_generation_writes_every_shard_and_a_manifest(made):
    manifest = json.loads(open(os.path.join(made["path"], "manifest.json")).read())
    n_train, n_val = len(made["train"]), len(made["val"])
    expected = 2 * -(-n_train // SHARD_BLOCKS) + -(-n_val // SHARD_BLOCKS)
    assert manifest["complete"] and len(manifest["shards"]) == expected == made["summary"]["written"]
    assert manifest["blocks"]["train"]["count"] == n_train and manifest["seq_len"] == 64
    assert manifest["topk"] == TOPK and manifest["epochs"] == 2 and manifest["temperature"] == 2.0
    assert manifest["teacher"]["weights_sha256"] == teacher_weights_sha256(made["cfg"].teacher.name)
    assert manifest["masking"]["predictions_per_block"] == 9 and manifest["masking"]["seed"] == 1234
    for name, meta in manifest["shards"].items():
        assert len(meta["sha256"]) == 64 and os.path.getsize(os.path.join(made["path"], SHARDS, name)) == meta["size"]


def test_round_trip_is_exact(made, tmp_path):
    # the storage itself: random rows written and read back memory-mapped, bit for bit
    rng = np.random.default_rng(0)
    rows = np.zeros(5, dtype=row_dtype(9, TOPK, "<u2"))
    rows["ids"] = rng.integers(0, 30522, rows["ids"].shape)
    rows["logprobs"] = -rng.random(rows["logprobs"].shape) * 20
    rows["lse"] = rng.random(rows["lse"].shape) * 30
    rows["positions"] = rng.integers(1, 63, rows["positions"].shape)
    os.makedirs(tmp_path / SHARDS)
    _write_shard(str(tmp_path), "x.npy", rows)
    back = np.load(tmp_path / SHARDS / "x.npy", mmap_mode="r")
    assert back.dtype == rows.dtype and back.tobytes() == rows.tobytes()

    # the generated rows: the teacher's top-k ids exactly, its values exactly as fp16 / fp32 hold them
    cache, cfg = TeacherCache(made["path"]), made["cfg"]
    spec = masking_spec_for(made["tokenizer"], cfg.data, static=False)
    draw, indices = 1, list(range(SHARD_BLOCKS, 2 * SHARD_BLOCKS))  # one whole shard = one generation batch
    batch = mask_batch([torch.from_numpy(made["train"][i].astype(np.int64)) for i in indices], indices, spec, draw)
    teacher = made["teacher"]
    ids, logprobs, lse = teacher_topk(teacher, teacher.cls, batch["input_ids"], batch["masked_positions"], TOPK, 2.0)
    rows = cache.rows("train", draw, indices)
    assert np.array_equal(rows["ids"], ids.numpy()) and np.array_equal(rows["positions"], batch["masked_positions"])
    assert np.array_equal(rows["logprobs"], logprobs.numpy().astype(np.float16))
    assert np.array_equal(rows["lse"], lse.numpy())
    looked_up = cache.lookup("train", draw, indices, batch["masked_positions"])
    assert torch.equal(looked_up["teacher_topk_ids"], ids)
    torch.testing.assert_close(looked_up["teacher_topk_logits"],
                               2.0 * (logprobs.half().float() + lse.unsqueeze(-1)))


def test_collate_masks_with_epoch_mod_draws_and_checks_positions(made):
    cache, cfg = TeacherCache(made["path"]), made["cfg"]
    spec = masking_spec_for(made["tokenizer"], cfg.data)
    collate = CachedTeacherCollate(spec, cache, "train")
    items = [(i, torch.from_numpy(made["train"][i].astype(np.int64))) for i in (200, 3, 77)]  # any order
    collate.epoch = 3  # 3 mod 2 cached draws -> draw 1
    batch = collate(items)
    again = mask_batch([b for _, b in items], [i for i, _ in items], spec, epoch=1)
    assert torch.equal(batch["input_ids"], again["input_ids"]) and batch["block_indices"].tolist() == [200, 3, 77]
    assert batch["teacher_topk_ids"].shape == (3, 9, TOPK)
    collate.epoch = 2  # draw 0: other masks, other rows
    assert not torch.equal(collate(items)["input_ids"], batch["input_ids"])
    with pytest.raises(KDError, match="masked positions"):  # a row looked up for other masks is refused
        cache.lookup("train", 0, [200, 3, 77], batch["masked_positions"])


def _live_topk_reference(s_full, t_full, k, mode, temperature, direction):
    """KL from the live teacher's full logits, restricted to its own top-k (the definition)."""
    ids = t_full.topk(k, dim=-1).indices
    if mode == "renormalize":
        return kl_div_logits(s_full.gather(-1, ids), t_full.gather(-1, ids), temperature, direction)
    p, q = F.softmax(t_full / temperature, -1), F.softmax(s_full / temperature, -1)
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1).double()
    q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1).double()
    a, b = (p, q) if direction == "forward" else (q, p)
    return temperature ** 2 * (a * (a.log() - b.log())).sum(-1).mean()


@pytest.mark.parametrize("mode", ["renormalize", "lse_tail"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_from_cache_equals_live_teacher_topk_kl(made, mode, direction):
    cache, cfg = TeacherCache(made["path"]), made["cfg"]
    collate = CachedTeacherCollate(masking_spec_for(made["tokenizer"], cfg.data), cache, "train")
    collate.epoch = 1
    batch = collate([(i, torch.from_numpy(made["train"][i].astype(np.int64))) for i in (5, 40, 41, 130)])
    t_full, _ = mlm_forward(made["teacher"], batch["input_ids"], batch["masked_positions"])  # live, same masks
    s_full = 3.0 * torch.randn(t_full.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch["teacher_topk_ids"], t_full.topk(TOPK, dim=-1).indices)
    from_cache = topk_kl(s_full, batch["teacher_topk_ids"], batch["teacher_topk_logits"], batch["teacher_lse"],
                         mode=mode, temperature=2.0, direction=direction)
    live = _live_topk_reference(s_full, t_full.float(), TOPK, mode, 2.0, direction)
    assert from_cache.item() > 1e-3
    torch.testing.assert_close(from_cache.double(), live.double(), rtol=2e-3, atol=1e-5)


def test_topk_kl_with_the_whole_vocabulary_is_the_full_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 50, generator=gen), 2 * torch.randn(2, 3, 50, generator=gen)
    for direction in ("forward", "reverse"):
        full = kl_div_logits(s, t, 1.5, direction)
        top, ids = t.topk(50, dim=-1)
        assert topk_kl(s, ids, top, mode="renormalize", temperature=1.5, direction=direction).item() == \
            pytest.approx(full.item(), rel=1e-5)
        lse = torch.logsumexp(t / 1.5, -1)
        top, ids = t.topk(49, dim=-1)  # one id left for the tail bucket: still exact
        assert topk_kl(s, ids, top, lse, "lse_tail", 1.5, direction).item() == pytest.approx(full.item(), rel=1e-4)


def test_a_manifest_that_does_not_match_the_run_is_refused_by_name(made, tmp_path_factory, small_corpus,
                                                                   shared_cache, tiny_teacher_dir):
    cache, root, tok = TeacherCache(made["path"]), made["root"], made["tokenizer"]
    args = (root, tiny_teacher_dir, small_corpus, shared_cache, made["path"])
    cache.check_config(make_cfg(*args), tok, teacher_weights_sha256(tiny_teacher_dir))  # the matching run
    with pytest.raises(KDError, match=r"seq_len: cache 64, run 32 \(set by data.seq_len\)"):
        cache.check_config(make_cfg(*args, **{"data.seq_len": 32}), tok)
    with pytest.raises(KDError, match=r"masking.probability.*data.mlm_probability"):
        cache.check_config(make_cfg(*args, **{"data.mlm_probability": 0.2}), tok)
    with pytest.raises(KDError, match=r"masking.seed.*data.mask_seed"):
        cache.check_config(make_cfg(*args, **{"data.mask_seed": 7}), tok)
    other = tmp_path_factory.mktemp("other_teacher")
    torch.manual_seed(1)
    from transformers import BertForMaskedLM
    BertForMaskedLM(tiny_bert_config()).save_pretrained(other)
    with pytest.raises(KDError, match=r"teacher.weights_sha256.*teacher.name"):
        cache.check_config(make_cfg(*args), tok, teacher_weights_sha256(str(other)))
    with pytest.raises(KDError, match=r"lse_tail needs .* loss.temperature=1.0.*temperature 2.0"):
        cache.check_config(make_cfg(*args, **{"loss.temperature": 1.0, "loss.topk_mode": "lse_tail"}), tok)
    cache.check_config(make_cfg(*args, **{"loss.temperature": 1.0}), tok)  # renormalize: any temperature
    moved = make_cfg(*args, **{"data.validation_fraction": 0.5})
    train, val = load_blocks(moved.data, tok, moved.data.split_seed)
    with pytest.raises(KDError, match=r"corpus: .*validation_fraction.*corpus token blocks \(blocks.train.count\)"):
        cache.check_blocks(moved, {"train": train, "validation": val})
    with pytest.raises(KDError, match=r"no teacher cache at"):
        TeacherCache(str(root / "nowhere"))


def test_corrupt_shard_is_caught_by_its_checksum(made, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(made["path"], folder)  # a copy: new inodes, so "once" hashes every shard again
    assert TeacherCache(str(folder)).verify("once")["hashed"] == made["summary"]["shards"]
    assert TeacherCache(str(folder)).verify("once")["hashed"] == 0  # unchanged since: trusted
    shard = folder / SHARDS / "train-e1-00002.npy"
    stat = os.stat(shard)
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40  # one bit in the last row's values; same size
    shard.write_bytes(bytes(data))
    with pytest.raises(KDError, match=r"train-e1-00002.npy fail their sha256 checksum"):
        TeacherCache(str(folder)).verify("once")  # the write changed its mtime: re-hashed
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a corruption that keeps size, mtime, inode
    assert TeacherCache(str(folder)).verify("once")["hashed"] == 0  # passes "once" (documented)...
    with pytest.raises(KDError, match=r"train-e1-00002.npy fail their sha256 checksum"):
        TeacherCache(str(folder)).verify("always")  # ...is what verify=always is for
    (folder / SHARDS / "validation-e0-00000.npy").write_bytes(b"short")
    with pytest.raises(KDError, match=r"validation-e0-00000.npy is truncated"):
        TeacherCache(str(folder)).verify("once")


def test_interrupted_generation_resumes_without_duplicates_or_gaps(made, tiny_teacher_dir, small_corpus,
                                                                   shared_cache, tmp_path):
    path = tmp_path / "tcache"
    cfg = make_cfg(tmp_path, tiny_teacher_dir, small_corpus, shared_cache, path)
    first = []

    def crash_after_four(name):
        first.append(name)
        if len(first) == 4:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        run_cache_generation(cfg, on_shard_written=crash_after_four)
    with pytest.raises(KDError, match="incomplete"):
        TeacherCache(str(path))
    # the 4th shard is damaged (as if the kill came mid-write); a leftover temp file is ignored
    with open(path / SHARDS / first[3], "r+b") as fh:
        fh.truncate(100)
    (path / SHARDS / "train-e1-00000.npy.tmp").write_bytes(b"partial")
    second = []
    summary = run_cache_generation(cfg, on_shard_written=second.append)
    total = made["summary"]["shards"]
    assert summary == {**summary, "shards": total, "written": total - 3, "skipped": 3}
    assert not set(second) & set(first[:3]) and first[3] in second and len(second) == total - 3
    resumed = json.loads((path / "manifest.json").read_text())["shards"]
    straight = json.loads(open(os.path.join(made["path"], "manifest.json")).read())["shards"]
    assert {n: s["sha256"] for n, s in resumed.items()} == {n: s["sha256"] for n, s in straight.items()}
    # a different config cannot finish (or overwrite) this folder
    with pytest.raises(KDError, match=r"other settings \(differs in: topk\)"):
        run_cache_generation(make_cfg(tmp_path, tiny_teacher_dir, small_corpus, shared_cache, path,
                                      **{"teacher_cache.topk": 8}))


def test_training_from_the_cache_never_loads_the_teacher(made, monkeypatch, tmp_path, small_corpus, shared_cache):
    import kd.pretrain

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(kd.pretrain, "load_teacher", no_teacher)
    overrides = cache_overrides(tmp_path, "x", small_corpus, shared_cache, made["path"], run_name="offline", steps=4,
                                **{"teacher.name": "null", "student.init": "random", "student.hidden_size": 64,
                                   "student.num_heads": 2, "student.intermediate_size": 128,
                                   "train.eval_every": 2, "train.save_every": 2, "loss.topk_mode": "lse_tail"})
    metrics = kd.pretrain.run_pretraining(load_config(PretrainConfig, None, overrides))
    records = [json.loads(line) for line in (tmp_path / "logs" / "offline" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["train/kd_kl"] > 0 for r in train) and not any("hidden" in k for r in train for k in r)
    assert 0 <= metrics["eval/teacher_agreement"] <= 100
    run_info = json.loads((tmp_path / "logs" / "offline" / "run.json").read_text())
    assert run_info["teacher_cache"] == made["path"] and run_info["teacher"] is None
    assert os.path.isfile(tmp_path / "ckpt" / "offline" / "final" / "model.safetensors")


def test_resume_from_the_cache_matches_an_uninterrupted_run(made, tmp_path, tiny_teacher_dir, small_corpus,
                                                            shared_cache):
    """Batches of 96: 2 steps per epoch (284 blocks), so the run resumed after step 2 reads draw 1."""
    from safetensors.torch import load_file
    from kd.pretrain import run_pretraining

    def train(run_name, **extra):
        items = {"train.batch_size": 96, "train.eval_every": 0, "train.eval_batches": 1, **extra}
        run_pretraining(make_cfg(tmp_path, tiny_teacher_dir, small_corpus, shared_cache, made["path"],
                                 run_name=run_name, steps=4, **items))
        return load_file(tmp_path / "ckpt" / run_name / "final" / "model.safetensors")

    straight = train("straight", **{"train.save_every": 0})
    train("halted", **{"train.save_every": 2})
    ckpt = tmp_path / "ckpt" / "halted"
    for name in os.listdir(ckpt):  # as if killed right after the step-2 checkpoint
        if name != "step_000002":
            shutil.rmtree(ckpt / name) if (ckpt / name).is_dir() else os.remove(ckpt / name)
    resumed = train("halted", **{"train.save_every": 2})
    records = map(json.loads, (tmp_path / "logs" / "halted" / "metrics.jsonl").read_text().splitlines())
    assert [r["epoch"] for r in records if "train/loss" in r][-1] == 1
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_hidden_losses_with_a_cache_are_a_config_error(made, tiny_teacher_dir, small_corpus, shared_cache, tmp_path):
    args = (tmp_path, tiny_teacher_dir, small_corpus, shared_cache, made["path"])
    with pytest.raises(KDError, match=r"alpha_hidden=1.0 but teacher_cache.path is set.*only its top-k"):
        validate_pretrain(make_cfg(*args, **{"loss.alpha_hidden": 1.0}))
    with pytest.raises(KDError, match=r"kd_positions=all .* masked positions only"):
        validate_pretrain(make_cfg(*args, **{"loss.kd_positions": "all"}))
    with pytest.raises(KDError, match=r"teacher_layers .* needs teacher.name"):
        validate_pretrain(make_cfg(*args, **{"teacher.name": "null"}))
    validate_pretrain(make_cfg(*args))  # teacher.name for the init only: allowed


def test_two_ranks_generate_the_same_cache_as_one_and_train_from_it(made, tiny_teacher_dir, small_corpus,
                                                                     shared_cache, tmp_path):
    ddp = [TORCHRUN, "--standalone", "--nproc_per_node=2"]

    def cli(script, path, *launcher, **extra):
        args = [*launcher, script, *cache_overrides(tmp_path, tiny_teacher_dir, small_corpus, shared_cache, path,
                                                    **{"teacher_cache.epochs": 1, **extra})]
        result = run_script(args)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run 1 thread each: the same arithmetic, so the same bytes
    try:
        run_cache_generation(make_cfg(tmp_path, tiny_teacher_dir, small_corpus, shared_cache, tmp_path / "one",
                                      **{"teacher_cache.epochs": 1}))
    finally:
        torch.set_num_threads(threads)
    cli("cache_teacher.py", tmp_path / "two", *ddp)
    one, two = (json.loads((tmp_path / p / "manifest.json").read_text()) for p in ("one", "two"))
    assert two["generation"]["world_size"] == 2 and two["complete"]
    assert {n: s["sha256"] for n, s in two["shards"].items()} == {n: s["sha256"] for n, s in one["shards"].items()}
    # two ranks train from it: each looks up the rows of its own blocks, and they verify the shards together
    cli("ddp_main.py", tmp_path / "two", *ddp, run_name="ddp-cache", steps=2, **{"train.save_every": 0})
    train = [r for r in map(json.loads, (tmp_path / "logs" / "ddp-cache" / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert train[-1]["step"] == 2 and train[-1]["tokens_seen"] == 2 * 2 * 4 * 64 and train[-1]["train/kd_kl"] > 0


def test_benchmark_tiny_preset_reports_the_ratio(tmp_path):
    result = run_script([PY, "bench/teacher_cache.py", "--preset", "tiny", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"cache/online step ratio: \d+\.\d\d", lines[-1]), lines[-1]
    report = json.loads((tmp_path / "teacher_cache-tiny-cpu.json").read_text())
    assert report["bytes_per_masked_position"] == 4 * report["topk"] + 6
    assert report["wikitext103"]["cache_bytes_per_epoch"] > 0 and report["ratio"] > 0
