"""The teacher cache's on-disk format (see kd/teacher_cache/__init__.py): shard rows, the
fingerprints a cache must match, the sealed manifest and the record of verified shards."""
import hashlib
import json
import logging
import os
from typing import Dict, List

import numpy as np

from kd.data.blocks import tokenizer_fingerprint
from kd.data.corpus import corpus_fingerprint
from kd.data.masking import MaskingSpec, masking_spec_for, num_predictions
from kd.errors import KDError
from kd.integrity import reason, sealed, sha256_file, space_note, unseal, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = 1
SPLITS = ("train", "validation")
MANIFEST, STAMP, SHARDS = "manifest.json", "verified.json", "shards"
# manifest keys that describe the generation itself rather than what the rows mean
RUN_ONLY_KEYS = ("complete", "shards", "generation", "created")


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


def short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "corpus":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(cached: dict, expected: dict) -> List[str]:
    """Dotted names of the fields of `expected` that `cached` does not match."""
    have, want = flatten(cached), flatten(expected)
    return [key for key in want if have.get(key) != want[key]]


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
