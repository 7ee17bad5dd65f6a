"""Reading a finished teacher cache in training: checks against the run, shard verification,
and the rows of a batch's blocks (memory-mapped)."""
import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from kd import dist
from kd.data.masking import MaskingSpec, mask_batch
from kd.errors import KDError
from kd.integrity import sha256_file
from kd.teacher_cache.format import (MANIFEST, SHARDS, blocks_identity, differences, flatten, read_manifest,
                                     read_stamp, row_dtype, run_identity, shard_name, short, stamp_entry,
                                     teacher_weights_sha256, write_stamp)

log = logging.getLogger(__name__)

# Which setting to change when a manifest field differs from the run's.
_HINTS = {
    "tokenizer": "data.tokenizer / teacher.name", "seq_len": "data.seq_len",
    "masking.probability": "data.mlm_probability", "masking.seed": "data.mask_seed",
    "masking.mask_token_id": "the tokenizer", "masking.vocab_size": "the tokenizer",
    "masking.special_ids": "the tokenizer", "masking.predictions_per_block": "data.seq_len / data.mlm_probability",
    "masking.scheme": "kd/data/masking.py", "format": "the kd version",
    "corpus": "data.source / data.train_files / data.validation_fraction",
    "split_seed": "data.split_seed, which draws the train/validation split",
    "blocks": "data.source / data.train_files / data.validation_fraction / train.seed",
    "teacher.weights_sha256": "teacher.name", "temperature": "loss.temperature",
}


class TeacherCache:
    """A finished cache folder, read through memory maps. Picklable for DataLoader workers."""

    def __init__(self, path: str):
        self.path = path
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise KDError(f"no teacher cache at {path} ({MANIFEST} missing). Make one with: python "
                          f"cache_teacher.py --config <this run's preset> teacher_cache.path={path}")
        self.manifest = m = read_manifest(manifest_path)
        if not m.get("complete"):
            raise KDError(f"teacher cache {path} is incomplete (its generation was interrupted). Rerun the "
                          f"same cache_teacher.py command: it keeps finished shards and writes the rest.")
        try:
            self.draws = {"train": int(m["epochs"]), "validation": 1}
            self.topk, self.shard_blocks = int(m["topk"]), int(m["shard_blocks"])
            self.temperature = float(m["temperature"])
            self.predictions = int(m["masking"]["predictions_per_block"])
            self.dtype = row_dtype(self.predictions, self.topk, m["ids_dtype"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # an unsealed (older) manifest
            raise KDError(f"{manifest_path}: malformed manifest ({type(err).__name__}: {err}). Regenerate "
                          f"the cache with cache_teacher.py.") from None
        self._open: Dict[str, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in each worker, not copied through a pickle
        return state

    @property
    def content_id(self) -> str:
        shards = json.dumps({n: s["sha256"] for n, s in sorted(self.manifest["shards"].items())})
        return hashlib.sha256(shards.encode()).hexdigest()[:16]

    # -- does it fit this run? --
    def _refuse(self, keys: List[str], expected: dict) -> None:
        have, want = flatten(self.manifest), flatten(expected)
        parts = []
        for key in keys:
            hint = _HINTS.get(key) or _HINTS.get(key.split(".")[0], "")
            label = f"corpus token blocks ({key})" if key.startswith("blocks.") else key
            parts.append(f"{label}: cache {short(have.get(key))}, run {short(want[key])}"
                         + (f" (set by {hint})" if hint else ""))
        raise KDError(f"teacher cache {self.path} does not match this run: " + "; ".join(parts) +
                      ". Regenerate it with cache_teacher.py and this run's config, or point "
                      "teacher_cache.path at a matching cache.")

    def check_config(self, cfg, tokenizer, teacher_sha: Optional[str] = None) -> None:
        """Tokenizer, seq_len, masking, and the teacher and temperature where they matter."""
        expected = run_identity(cfg, tokenizer)
        if teacher_sha is not None:
            expected["teacher"] = {"weights_sha256": teacher_sha}
        if cfg.loss.topk_mode == "lse_tail":
            expected["temperature"] = float(cfg.loss.temperature)
        keys = differences(self.manifest, expected)
        if keys == ["temperature"]:
            raise KDError(f"loss.topk_mode=lse_tail needs the teacher's log-sum-exp at loss.temperature="
                          f"{cfg.loss.temperature}, but teacher cache {self.path} holds it at temperature "
                          f"{self.temperature}. Set loss.temperature={self.temperature}, use "
                          f"loss.topk_mode=renormalize (exact at any temperature), or make a cache with "
                          f"loss.temperature={cfg.loss.temperature}.")
        if keys:
            self._refuse(keys, expected)

    def check_blocks(self, cfg, splits: Dict[str, np.ndarray]) -> None:
        """The run's token blocks must be the ones the teacher saw (content hash)."""
        expected = blocks_identity(cfg, splits)
        keys = [k for k in differences(self.manifest, expected) if k not in ("corpus", "split_seed")]
        if keys:  # the corpus fingerprint and split seed only explain a difference in the blocks
            extra = [k for k in ("corpus", "split_seed") if self.manifest.get(k) != expected[k]]
            self._refuse(extra + keys, expected)

    def verify(self, mode: str = "once", rank: int = 0, world_size: int = 1) -> dict:
        """Sizes always; sha256 of every shard (mode=always) or of those not verified unchanged."""
        started = time.time()
        shards = self.manifest["shards"]
        stamp = read_stamp(self.path) if mode == "once" else {}
        todo = []
        for name in sorted(shards):
            path = os.path.join(self.path, SHARDS, name)
            if not os.path.isfile(path):
                raise KDError(f"teacher cache {self.path}: shard {name} is missing. Rerun the cache_teacher.py "
                              f"command that made the cache: it rewrites missing shards.")
            if os.path.getsize(path) != shards[name]["size"]:
                raise KDError(f"teacher cache {self.path}: shard {name} is truncated ({os.path.getsize(path)} "
                              f"of {shards[name]['size']} bytes). Rerun the cache_teacher.py command that made "
                              f"the cache: it rewrites shards that fail their checks.")
            if stamp.get(name) != stamp_entry(path, shards[name]["sha256"]):
                todo.append(name)
        bad = [n for n in todo[rank::world_size]
               if sha256_file(os.path.join(self.path, SHARDS, n)) != shards[n]["sha256"]]
        bad = sorted(sum(dist.all_gather_object(bad), []))
        if bad:
            raise KDError(f"teacher cache {self.path}: shard(s) {', '.join(bad[:5])}"
                          f"{' ...' if len(bad) > 5 else ''} fail their sha256 checksum (corrupt). Rerun the "
                          f"cache_teacher.py command that made the cache: it rewrites shards that fail "
                          f"their checksum and keeps the rest.")
        if todo and dist.is_rank0():
            stamp.update({n: stamp_entry(os.path.join(self.path, SHARDS, n), shards[n]["sha256"]) for n in todo})
            write_stamp(self.path, stamp)
        hashed = sum(shards[n]["size"] for n in todo)
        log.info("teacher cache %s: %d shards; sha256 checked for %d (%.1f MB) in %.1f s, %d unchanged since "
                 "their last check (teacher_cache.verify=%s)", self.path, len(shards), len(todo), hashed / 2 ** 20,
                 time.time() - started, len(shards) - len(todo), mode)
        return {"shards": len(shards), "hashed": len(todo)}

    # -- rows --
    def _shard(self, split: str, draw: int, index: int) -> np.ndarray:
        name = shard_name(split, draw, index)
        array = self._open.get(name)
        if array is None:
            meta = self.manifest["shards"].get(name)
            if meta is None:
                raise KDError(f"teacher cache {self.path} has no shard {name}; it does not cover this run's data")
            array = np.load(os.path.join(self.path, SHARDS, name), mmap_mode="r")
            if array.dtype != self.dtype or len(array) != meta["rows"]:
                raise KDError(f"teacher cache {self.path}: shard {name} has an unexpected layout; regenerate it")
            self._open[name] = array
        return array

    def rows(self, split: str, draw: int, block_indices: Sequence[int]) -> np.ndarray:
        out = np.empty(len(block_indices), dtype=self.dtype)
        for i, block in enumerate(block_indices):
            index, row = divmod(int(block), self.shard_blocks)
            out[i] = self._shard(split, draw, index)[row]
        return out

    def lookup(self, split: str, draw: int, block_indices: Sequence[int],
               masked_positions: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Batch fields for the rows of these blocks: ids (B, P, K) int64, untempered logits
        (B, P, K) and lse at the cache temperature (B, P), float32."""
        rows = self.rows(split, draw, block_indices)
        if masked_positions is not None and not np.array_equal(rows["positions"], masked_positions.numpy()):
            raise KDError(f"teacher cache {self.path}: the masked positions cached for {split} blocks "
                          f"(draw {draw}) differ from this run's masks, so the masking code or the data "
                          f"changed since the cache was made. Regenerate it with cache_teacher.py.")
        lse = torch.from_numpy(rows["lse"].astype(np.float32))
        logprobs = torch.from_numpy(rows["logprobs"].astype(np.float32))
        return {"teacher_topk_ids": torch.from_numpy(rows["ids"].astype(np.int64)),
                "teacher_topk_logits": self.temperature * (logprobs + lse.unsqueeze(-1)),
                "teacher_lse": lse}


class CachedTeacherCollate:
    """MLMCollate plus the teacher's cached rows: epoch E masks with draw E mod (cached draws)."""

    def __init__(self, spec: MaskingSpec, cache: TeacherCache, split: str):
        self.spec = replace(spec, static=False)  # the draw index picks the mask, as at generation
        self.cache, self.split = cache, split
        self.epoch = 0

    def __call__(self, items):
        indices = [i for i, _ in items]
        draw = self.epoch % self.cache.draws[self.split]
        batch = mask_batch([b for _, b in items], indices, self.spec, draw)
        batch.update(self.cache.lookup(self.split, draw, indices, batch["masked_positions"]))
        return batch


def open_for_training(cfg, tokenizer, teacher_ref: Optional[str]) -> TeacherCache:
    """Open and check what the config alone decides, before the teacher or data are loaded."""
    cache = TeacherCache(cfg.teacher_cache.path)
    teacher_sha = dist.rank0_first(lambda: teacher_weights_sha256(teacher_ref), share_result=True) if teacher_ref else None
    cache.check_config(cfg, tokenizer, teacher_sha)
    log.info("teacher cache %s: teacher %s, k=%d, %d mask draw(s) (epoch E uses draw E mod %d), "
             "temperature %g, loss.topk_mode=%s%s", cache.path, cache.manifest["teacher"]["name"], cache.topk,
             cache.draws["train"], cache.draws["train"], cache.temperature, cfg.loss.topk_mode,
             "" if teacher_ref else " (teacher.name unset: the teacher's weights are not cross-checked)")
    return cache
