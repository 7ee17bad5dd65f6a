"""Small pieces that keep files honest: file checksums and atomic writes, JSON that carries its own
checksum, what a write that failed for lack of space (or any other I/O error) reports, and the
identity of a run that its checkpoints must match.

A sealed JSON object holds "seal": the sha256 of the rest of the object in canonical form, so a
flipped byte anywhere in it (a value, not only its syntax) is caught when it is read. Objects
written before seals existed have none and are read as they are: a flip cannot remove the seal
and change a value at once.
"""
import hashlib
import json
import os
import shutil
from typing import Optional

from kd.errors import KDError

SEAL = "seal"
# Settings a run may change when it resumes: how long it runs, how it logs, evaluates and saves,
# and where things live. Every other setting is part of the run's identity (checked by Checkpointer.load).
RESUMABLE_KEYS = ("log_dir", "checkpoint_dir", "data.cache_dir", "teacher_cache", "train.max_steps",
                  "train.epochs", "train.eval_every", "train.eval_every_epoch", "train.eval_batches",
                  "train.save_every", "train.keep_last", "train.log_every", "train.resume", "train.num_workers",
                  "train.device", "train.compile", "train.max_nonfinite_skips", "train.export_steps")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:  # a full disk: leave no temp file behind, and the old file as it was
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _digest(payload: dict) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sealed(payload: dict) -> dict:
    """The payload with its seal (any old seal is replaced)."""
    rest = {k: v for k, v in payload.items() if k != SEAL}
    return {**rest, SEAL: _digest(rest)}


def unseal(payload: dict, path: str) -> dict:
    """The payload without its seal; KDError when the seal does not match the content."""
    if not isinstance(payload, dict):
        raise KDError(f"{path}: not a JSON object (corrupt)")
    rest = {k: v for k, v in payload.items() if k != SEAL}
    if SEAL in payload and payload[SEAL] != _digest(rest):
        raise KDError(f"{path}: its content does not match its checksum (corrupt or edited)")
    return rest


def free_bytes(path: str) -> Optional[int]:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def mb(num_bytes: Optional[int]) -> str:
    return "unknown" if num_bytes is None else f"{num_bytes / 2 ** 20:.1f} MB"


def reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def space_note(path: str, needed_bytes: int) -> str:
    """How much a write needed against what its filesystem has free, for a failed write's message."""
    return f"about {mb(needed_bytes)} needed, {mb(free_bytes(path))} free on that filesystem"


def run_identity(config: dict, resumable=RESUMABLE_KEYS) -> dict:
    """The config without the settings a resumed run may change: what a checkpoint must match."""
    def keep(tree: dict, prefix: str) -> dict:
        return {k: (keep(v, f"{prefix}{k}.") if isinstance(v, dict) else v)
                for k, v in tree.items() if f"{prefix}{k}" not in resumable}
    return keep(config, "")
