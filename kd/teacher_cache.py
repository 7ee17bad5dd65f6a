"""Offline teacher: its top-k logits at every masked position, computed once, read back in training.

`cache_teacher.py` runs the teacher over the training blocks (`teacher_cache.epochs` mask draws)
and the validation blocks (the eval masks), and stores per block, at each masked position, the
teacher's top-k token ids and log-probabilities and the log-sum-exp over the full vocabulary.
`ddp_main.py ... teacher_cache.path=<dir>` then distils from these rows without a teacher in
memory (one named by teacher.name is loaded only for a teacher_layers init, then freed).

Masks. Row (split, draw c, block b) was computed on `mask_block(block b, spec, epoch=c,
block_index=b)`: the run's own masking code, seed data.mask_seed, static=False. In training,
epoch E masks with draw c = E mod epochs and looks rows up by the block indices the batch carries,
never by iteration order, so shuffling, DDP and resume cannot misalign them; every row also keeps
its masked positions, which are checked against the batch's. Validation rows use draw 0, which is
what the (static) eval masks are.

Layout of a cache folder:
    manifest.json                  what the cache was made from (teacher weights sha256, tokenizer,
                                   seq_len, token blocks sha256, masking, k, T) and the size and
                                   sha256 of every shard; "complete": true once all shards exist;
                                   "seal": the sha256 of all that (kd/integrity.py), checked on read
    shards/<split>-e<c>-<i>.npy    blocks [i*S, (i+1)*S) of a split, one structured row per block,
                                   read memory-mapped
    shards/<...>.npy.json          the shard's size and sha256, written after it: a shard without one
                                   is partial and gets rewritten when generation resumes
    verified.json                  size, mtime and inode of shards whose sha256 was checked
    tokenizer/                     the teacher's tokenizer (the run's default when no other is named)

Row of a shard (P masked positions per block, K = teacher_cache.topk; 4K + 6 bytes per position):
    lse        float32 (P,)    logsumexp(z / T) over the full vocabulary
    positions  uint16  (P,)    the masked positions
    ids        uint16  (P, K)  the top-k token ids, most likely first (uint32 if the vocab needs it)
    logprobs   float16 (P, K)  log_softmax(z / T) at those ids
T is loss.temperature when the cache was made (manifest "temperature"); the untempered teacher
logits are z = T * (logprobs + lse).

Why log-probabilities rather than raw logits in fp16: the same bytes, but fp16's error grows with
magnitude and the log-probs of likely tokens sit near 0, where fp16 is finest. Raw logits of 10-30
carry errors up to ~0.01, i.e. ~1% on every probability, which would drown the teacher's tail mass
1 - sum(top-k) that lse_tail needs. lse stays float32 because it is added back to every value.

Temperature. loss.topk_mode=renormalize works at any loss.temperature: a softmax over the k ids
needs only their logits. lse_tail needs logsumexp(z / T') over the whole vocabulary, which the
cache holds at its own T only, so it requires loss.temperature == T (make the cache with
loss.temperature=T' on the cache_teacher.py command line for another T').

Verification. Every load checks that all shards exist with their recorded sizes. A shard's sha256
is checked once, by the generation or on the first load (split across ranks), and recorded in
verified.json with its size, mtime and inode; later loads re-hash only shards whose stat changed
(a copy, an edit, a rewrite). teacher_cache.verify=always re-hashes every shard on every load.
The folder must be on a filesystem that every rank sees, for writing and for reading.
"""
import copy
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from kd import dist, fault_points
from kd.checkpoint import _sha256 as sha256_file
from kd.checkpoint import write_text_atomic
from kd.data.blocks import tokenizer_fingerprint
from kd.data.corpus import corpus_fingerprint
from kd.data.masking import MaskingSpec, mask_batch, masking_spec_for, num_predictions
from kd.errors import KDError
from kd.integrity import reason, sealed, space_note, unseal
from kd.models import gather_positions
from kd.run_inputs import TOKENIZER_DIR, check_compatible, tokenizer_ref

log = logging.getLogger(__name__)

FORMAT = 1
SPLITS = ("train", "validation")
MANIFEST, STAMP, SHARDS = "manifest.json", "verified.json", "shards"
# manifest keys that describe the generation itself rather than what the rows mean
_RUN_ONLY_KEYS = ("complete", "shards", "generation", "created")


# ---- formats and fingerprints ----------------------------------------------------------------

def ids_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 2 ** 16 else "<u4"


def row_dtype(predictions: int, topk: int, ids: str) -> np.dtype:
    return np.dtype([("lse", "<f4", (predictions,)), ("positions", "<u2", (predictions,)),
                     ("ids", ids, (predictions, topk)), ("logprobs", "<f2", (predictions, topk))])


def bytes_per_position(topk: int, vocab_size: int = 30522) -> int:
    return row_dtype(1, topk, ids_dtype(vocab_size)).itemsize


def shard_name(split: str, draw: int, index: int) -> str:
    return f"{split}-e{draw}-{index:05d}.npy"


def blocks_sha256(blocks: np.ndarray) -> str:
    """Content hash of a (memory-mapped) token block array, read in 64 MB slices."""
    digest = hashlib.sha256(f"{blocks.dtype.str}{tuple(blocks.shape)}".encode())
    step = max(1, (64 << 20) // max(1, blocks[0].nbytes)) if len(blocks) else 1
    for lo in range(0, len(blocks), step):
        digest.update(np.ascontiguousarray(blocks[lo:lo + step]).tobytes())
    return digest.hexdigest()


def teacher_weights_sha256(ref: str) -> str:
    """sha256 over the teacher's weight files: independent of the dtype it is loaded in."""
    from kd.assets import resolve_model_ref
    folder = resolve_model_ref(ref)
    if not os.path.isdir(folder):
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(folder, local_files_only=True)
        except Exception as err:  # not downloaded: nothing to fingerprint
            raise KDError(f"cannot find the weight files of teacher '{ref}' locally to fingerprint them "
                          f"({type(err).__name__}); use a local folder for teacher.name") from None
    names = sorted(os.listdir(folder))
    files = [n for n in names if n.endswith(".safetensors")] or \
            [n for n in names if n.endswith(".bin") and n != "training_args.bin"]
    if not files:
        raise KDError(f"teacher '{ref}': no .safetensors or .bin weight files in {folder}")
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}:{sha256_file(os.path.join(folder, name))}\n".encode())
    return digest.hexdigest()


def masking_identity(spec: MaskingSpec, seq_len: int) -> dict:
    return {"scheme": "kd.data.masking: per-block generator seeded by (seed, draw, block index)",
            "probability": spec.probability, "seed": spec.seed, "mask_token_id": spec.mask_token_id,
            "vocab_size": spec.vocab_size, "special_ids": list(spec.special_ids),
            "predictions_per_block": num_predictions(seq_len, spec.probability)}


def run_identity(cfg, tokenizer) -> dict:
    """What a cache must agree with, from the config and tokenizer alone."""
    spec = masking_spec_for(tokenizer, cfg.data, static=False)
    return {"format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": cfg.data.seq_len,
            "masking": masking_identity(spec, cfg.data.seq_len)}


def blocks_identity(cfg, splits: Dict[str, np.ndarray]) -> dict:
    return {"corpus": corpus_fingerprint(cfg.data), "split_seed": cfg.data.split_seed,
            "blocks": {s: {"count": int(len(b)), "sha256": blocks_sha256(b)} for s, b in splits.items()}}


def cache_identity(cfg, tokenizer, splits, teacher_name: str, teacher_sha: str, vocab_size: int) -> dict:
    tc = cfg.teacher_cache
    return {**run_identity(cfg, tokenizer), **blocks_identity(cfg, splits),
            "teacher": {"name": teacher_name, "weights_sha256": teacher_sha},
            "topk": tc.topk, "epochs": tc.epochs, "temperature": float(cfg.loss.temperature),
            "shard_blocks": tc.shard_blocks, "ids_dtype": ids_dtype(vocab_size)}


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "corpus":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(cached: dict, expected: dict) -> List[str]:
    """Dotted names of the fields of `expected` that `cached` does not match."""
    have, want = _flatten(cached), _flatten(expected)
    return [key for key in want if have.get(key) != want[key]]


# ---- reading -----------------------------------------------------------------------------------

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
        have, want = _flatten(self.manifest), _flatten(expected)
        parts = []
        for key in keys:
            hint = _HINTS.get(key) or _HINTS.get(key.split(".")[0], "")
            label = f"corpus token blocks ({key})" if key.startswith("blocks.") else key
            parts.append(f"{label}: cache {_short(have.get(key))}, run {_short(want[key])}"
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
    teacher_sha = _on_rank0(lambda: teacher_weights_sha256(teacher_ref)) if teacher_ref else None
    cache.check_config(cfg, tokenizer, teacher_sha)
    log.info("teacher cache %s: teacher %s, k=%d, %d mask draw(s) (epoch E uses draw E mod %d), "
             "temperature %g, loss.topk_mode=%s%s", cache.path, cache.manifest["teacher"]["name"], cache.topk,
             cache.draws["train"], cache.draws["train"], cache.temperature, cfg.loss.topk_mode,
             "" if teacher_ref else " (teacher.name unset: the teacher's weights are not cross-checked)")
    return cache


# ---- stamps of verified shards --------------------------------------------------------------

def stamp_entry(path: str, sha256: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "dev": st.st_dev, "ino": st.st_ino, "sha256": sha256}


def read_stamp(folder: str) -> dict:
    try:
        with open(os.path.join(folder, STAMP)) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}


def write_stamp(folder: str, stamp: dict) -> None:
    try:
        write_text_atomic(os.path.join(folder, STAMP), json.dumps(stamp, indent=0, sort_keys=True))
    except OSError as err:  # a read-only cache still works: it is re-hashed on every load
        log.warning("could not record verified shards in %s (%s); they will be re-hashed next time", folder, err)


# ---- the manifest: sealed (a checksum over its content), written atomically ----------------

def read_manifest(path: str) -> dict:
    try:
        with open(path) as fh:
            return unseal(json.load(fh), path)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise KDError(f"{path}: unreadable manifest ({err}). Regenerate the cache with cache_teacher.py.") from None


def write_manifest(folder: str, manifest: dict) -> None:
    path = os.path.join(folder, MANIFEST)
    text = json.dumps(sealed(manifest), indent=1)
    try:
        write_text_atomic(path, text)
    except OSError as err:
        raise KDError(f"could not write {path} ({reason(err)}); {space_note(path, len(text))}. Free disk "
                      f"space and rerun the same cache_teacher.py command: finished shards are kept.") from None


# ---- collectives (no-ops without a process group) --------------------------------------------

def _on_rank0(fn: Callable):
    """fn() on rank 0, its result on every rank (KDErrors too)."""
    box = [None, None]
    if dist.is_rank0():
        try:
            box[0] = fn()
        except KDError as err:
            box[1] = str(err)
    if tdist.is_initialized():
        tdist.broadcast_object_list(box, src=0, group=dist.control_group())
    if box[1] is not None:
        raise KDError(box[1])
    return box[0]


# ---- generation -------------------------------------------------------------------------------

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
            keys = differences({k: v for k, v in existing.items() if k not in _RUN_ONLY_KEYS}, identity)
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
    from kd.config import validate_cache_generation
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
    teacher_sha = _on_rank0(lambda: teacher_weights_sha256(cfg.teacher.name))
    train_blocks, val_blocks = load_blocks(cfg.data, tokenizer, cfg.data.split_seed)
    log.info("teacher cache: %s over %d train blocks x %d mask draw(s) + %d validation blocks, on %s x%d",
             cfg.teacher.name, len(train_blocks), cfg.teacher_cache.epochs, len(val_blocks), info.device,
             info.world_size)
    return generate(cfg, info, teacher, tokenizer, {"train": train_blocks, "validation": val_blocks},
                    teacher_sha, on_shard_written)
