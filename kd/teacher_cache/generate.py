"""Generating a teacher cache (cache_teacher.py): the teacher's top-k at every masked position,
written shard by shard by every rank, resumable, then the sealed manifest."""
import copy
import io
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from kd import dist, fault_points
from kd.data.masking import mask_batch, masking_spec_for
from kd.errors import KDError
from kd.integrity import reason, sha256_file, space_note, write_text_atomic
from kd.models import gather_positions
from kd.run_inputs import TOKENIZER_DIR, check_compatible, tokenizer_ref
from kd.teacher_cache.format import (MANIFEST, RUN_ONLY_KEYS, SHARDS, SPLITS, cache_identity, differences,
                                     read_manifest, row_dtype, shard_name, stamp_entry, teacher_weights_sha256,
                                     write_manifest, write_stamp)

log = logging.getLogger(__name__)

@torch.inference_mode()
def teacher_topk(teacher, head, input_ids: torch.Tensor, positions: torch.Tensor, topk: int,
                 temperature: float):
    """(ids, log-probs at T, lse at T) of the teacher at the masked positions, all (B, P[, K])."""
    hidden = teacher.bert(input_ids=input_ids).last_hidden_state
    head_dtype = next(head.parameters()).dtype
    logits = head(gather_positions(hidden, positions).to(head_dtype)).float() / temperature
    lse = torch.logsumexp(logits, -1)
    top, ids = logits.topk(topk, dim=-1)
    return ids, top - lse.unsqueeze(-1), lse


def _completed(folder: str, name: str, rows: int) -> Optional[dict]:
    """The record of a finished shard whose bytes still match it, else None (rewrite it)."""
    path = os.path.join(folder, SHARDS, name)
    try:
        with open(path + ".json") as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    if (not os.path.isfile(path) or record.get("rows") != rows or os.path.getsize(path) != record.get("size")
            or sha256_file(path) != record.get("sha256")):
        return None
    return record


def _write_shard(folder: str, name: str, rows: np.ndarray) -> dict:
    """The shard, then its record: a shard without a record is rewritten when generation resumes."""
    path = os.path.join(folder, SHARDS, name)
    tmp = path + ".tmp"
    buffer = io.BytesIO()
    np.save(buffer, rows)  # then one plain write: numpy's own file writes lose the errno of a full disk
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        fault_points.reached("teacher_cache.shard_tmp_written")
        os.replace(tmp, path)
        fault_points.reached("teacher_cache.shard_renamed")
        record = {"rows": int(len(rows)), "size": os.path.getsize(path), "sha256": sha256_file(path)}
        write_text_atomic(path + ".json", json.dumps(record))
    except OSError as err:  # a full disk: nothing half-written stays that a rerun could take as finished
        for leftover in (tmp, path):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise KDError(f"teacher cache: could not write shard {path} ({reason(err)}); "
                      f"{space_note(path, buffer.getbuffer().nbytes)}. Free disk space and rerun the same "
                      f"cache_teacher.py command: finished shards are kept.") from None
    fault_points.reached("teacher_cache.shard_recorded")
    return record


def _start_manifest(folder: str, identity: dict, tokenizer) -> None:
    """A new folder, or one holding (part of) the same cache; anything else is refused."""
    path = os.path.join(folder, MANIFEST)
    if os.path.isfile(path):
        try:
            existing = read_manifest(path)
        except KDError:  # corrupt: rewritten below; finished shards are trusted only through their records
            existing = None
        if existing is not None:
            keys = differences({k: v for k, v in existing.items() if k not in RUN_ONLY_KEYS}, identity)
            if keys:
                raise KDError(f"{folder} already holds a teacher cache made with other settings (differs in: "
                              f"{', '.join(keys)}). Use another teacher_cache.path, or delete {folder} to "
                              f"start over.")
            if existing.get("complete"):
                log.info("%s is already complete; checking its shards", folder)
    os.makedirs(os.path.join(folder, SHARDS), exist_ok=True)
    # incomplete until every shard is checked again: an interrupted rerun must not look finished
    write_manifest(folder, {**identity, "complete": False})
    tokenizer.save_pretrained(os.path.join(folder, TOKENIZER_DIR))


def generate(cfg, info: dist.DistInfo, teacher, tokenizer, splits: Dict[str, np.ndarray], teacher_sha: str,
             on_shard_written: Optional[Callable[[str], None]] = None) -> dict:
    """Write (or finish) the cache; every rank writes the shards j with j % world_size == rank."""
    tc, folder = cfg.teacher_cache, cfg.teacher_cache.path
    vocab = teacher.config.vocab_size
    if not tc.topk < vocab:
        raise KDError(f"teacher_cache.topk={tc.topk} must be smaller than the vocabulary ({vocab})")
    if cfg.data.seq_len > 2 ** 16:
        raise KDError(f"data.seq_len={cfg.data.seq_len} is too long for the cache's uint16 positions")
    identity = cache_identity(cfg, tokenizer, splits, cfg.teacher.name, teacher_sha, vocab)
    dist.rank0_first(lambda: _start_manifest(folder, identity, tokenizer))

    spec = masking_spec_for(tokenizer, cfg.data, static=False)
    predictions = identity["masking"]["predictions_per_block"]
    dtype = row_dtype(predictions, tc.topk, identity["ids_dtype"])
    draws = {"train": tc.epochs, "validation": 1}
    jobs = [(split, draw, index) for split in SPLITS for draw in range(draws[split])
            for index in range(math.ceil(len(splits[split]) / tc.shard_blocks))]
    mine = jobs[info.rank::info.world_size]

    def span(split, index):
        start = index * tc.shard_blocks
        return start, min(start + tc.shard_blocks, len(splits[split]))

    # The head in fp32 even when the encoder runs in bf16: stored values are fp16, finer than bf16.
    head = teacher.cls if next(teacher.parameters()).dtype == torch.float32 else copy.deepcopy(teacher.cls).float()
    batch_size = tc.batch_size or cfg.train.batch_size
    records, written, computed_blocks, compute_s = {}, 0, 0, 0.0
    # a context, so that the bar is closed on an error too and the error's line starts a line
    with tqdm(total=sum(span(s, i)[1] - span(s, i)[0] for s, _, i in mine), unit="block", desc="teacher cache",
              disable=not info.is_main, mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        for split, draw, index in mine:
            name = shard_name(split, draw, index)
            start, end = span(split, index)
            record = _completed(folder, name, end - start)
            if record is None:
                rows = np.zeros(end - start, dtype=dtype)
                blocks = splits[split]
                tick = time.time()
                for lo in range(start, end, batch_size):
                    hi = min(lo + batch_size, end)
                    batch = mask_batch([torch.from_numpy(np.asarray(blocks[i], dtype=np.int64)) for i in range(lo, hi)],
                                       list(range(lo, hi)), spec, draw)
                    ids, logprobs, lse = teacher_topk(teacher, head, batch["input_ids"].to(info.device),
                                                      batch["masked_positions"].to(info.device), tc.topk,
                                                      cfg.loss.temperature)
                    part = rows[lo - start:hi - start]
                    part["positions"] = batch["masked_positions"].numpy()
                    part["ids"] = ids.cpu().numpy()
                    part["logprobs"] = logprobs.cpu().numpy()
                    part["lse"] = lse.cpu().numpy()
                    bar.update(hi - lo)
                compute_s += time.time() - tick
                computed_blocks += end - start
                record = _write_shard(folder, name, rows)
                written += 1
                if on_shard_written is not None:
                    on_shard_written(name)
            else:
                bar.update(end - start)
            records[name] = {"split": split, "draw": draw, "index": index, "start": start, **record}

    gathered = dist.all_gather_object({"records": records, "written": written, "blocks": computed_blocks, "seconds": compute_s})
    shards = {name: rec for part in gathered for name, rec in part["records"].items()}
    written = sum(p["written"] for p in gathered)
    summary = {"shards": len(shards), "written": written, "skipped": len(shards) - written,
               "bytes": sum(r["size"] for r in shards.values()),
               "blocks_per_s": sum(p["blocks"] / p["seconds"] for p in gathered if p["seconds"] > 0)}
    if info.is_main:
        manifest = {**identity, "complete": True, "created": time.time(),
                    "generation": {"world_size": info.world_size, "device": str(info.device),
                                   "blocks_per_s": summary["blocks_per_s"]},
                    "shards": dict(sorted(shards.items()))}
        # every shard was hashed as it was written, or checked when skipped: record that
        write_stamp(folder, {n: stamp_entry(os.path.join(folder, SHARDS, n), r["sha256"]) for n, r in shards.items()})
        fault_points.reached("teacher_cache.manifest_pending")
        write_manifest(folder, manifest)
        log.info("teacher cache %s: %d shards (%d written, %d already done), %.1f MB; %d train blocks x %d "
                 "draw(s) + %d validation blocks, %d masked positions each, k=%d; %.1f blocks/s",
                 folder, summary["shards"], summary["written"], summary["skipped"], summary["bytes"] / 2 ** 20,
                 len(splits["train"]), tc.epochs, len(splits["validation"]), predictions, tc.topk,
                 summary["blocks_per_s"])
    dist.barrier()
    return summary


def run_cache_generation(cfg, on_shard_written: Optional[Callable[[str], None]] = None) -> dict:
    """cache_teacher.py: config -> tokenizer, teacher, blocks -> shards and manifest."""
    from kd.config_checks import validate_cache_generation
    validate_cache_generation(cfg)
    info = dist.setup(cfg.train.device)
    try:
        return _generate(cfg, info, on_shard_written)
    finally:
        dist.teardown()


def _generate(cfg, info: dist.DistInfo, on_shard_written) -> dict:
    from kd.data.blocks import load_blocks
    from kd.logger import setup_console_logging
    from kd.models import load_teacher, load_tokenizer
    setup_console_logging()
    tokenizer = load_tokenizer(tokenizer_ref(cfg))
    teacher = load_teacher(cfg.teacher, info.device)
    check_compatible(cfg, tokenizer, teacher)
    teacher_sha = dist.rank0_first(lambda: teacher_weights_sha256(cfg.teacher.name), share_result=True)
    train_blocks, val_blocks = load_blocks(cfg.data, tokenizer, cfg.data.split_seed)
    log.info("teacher cache: %s over %d train blocks x %d mask draw(s) + %d validation blocks, on %s x%d",
             cfg.teacher.name, len(train_blocks), cfg.teacher_cache.epochs, len(val_blocks), info.device,
             info.world_size)
    return generate(cfg, info, teacher, tokenizer, {"train": train_blocks, "validation": val_blocks},
                    teacher_sha, on_shard_written)
