"""Checkpoints that a crash cannot corrupt, exact resume, and Hugging Face export.

Layout of `checkpoints/<run_name>/`:
    step_000400/          model.safetensors, optimizer.pt, scheduler.pt, state.json,
                          rng_rank<r>.pt (one per rank), manifest.json (sha256 of every file)
    latest                name of the newest verified checkpoint
    final/                the exported student (from_pretrained-ready) with its tokenizer

A checkpoint is written into a temporary folder, fsynced and renamed, then re-read and verified
against its manifest, and only then named in `latest`; older ones are pruned after that. Weights
are safetensors and the rest loads with `torch.load(weights_only=True)` or JSON: nothing is
unpickled.
"""
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Optional

import torch
from safetensors.torch import load_model, save_model

from kd import dist
from kd.errors import KDError

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Torch RNG only: masks have their own per-block seeds, so dropout is all that draws here."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def verify(folder: str) -> None:
    """Raise KDError naming the first missing or corrupt file."""
    manifest_path = os.path.join(folder, "manifest.json")
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise KDError(f"{manifest_path}: unreadable manifest ({err})") from None
    for name, meta in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise KDError(f"{path}: missing")
        if os.path.getsize(path) != meta["size"]:
            raise KDError(f"{path}: truncated ({os.path.getsize(path)} of {meta['size']} bytes)")
        if _sha256(path) != meta["sha256"]:
            raise KDError(f"{path}: checksum mismatch (corrupt)")


def config_diff(saved: dict, current: dict, prefix: str = "") -> list:
    """[(dotted key, saved value, current value)] for every leaf that differs, e.g. student.num_layers."""
    diff = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diff.extend(config_diff(old, new, f"{prefix}{key}."))
        elif old != new:
            diff.append((f"{prefix}{key}", old, new))
    return diff


class Checkpointer:
    def __init__(self, run_dir: str, keep_last: int, config_fingerprint: dict):
        self.run_dir = run_dir
        self.keep_last = keep_last
        self.fingerprint = config_fingerprint

    # ---- saving -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, optimizer, scheduler, scaler, state: dict) -> Optional[str]:
        """Collective: every rank calls it. Returns the checkpoint folder on rank 0."""
        name = f"step_{state['step']:06d}"
        final = os.path.join(self.run_dir, name)
        tmp = os.path.join(self.run_dir, f".tmp-{name}")
        error = None
        if dist.is_rank0():
            os.makedirs(self.run_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        rank = int(os.environ.get("RANK", "0"))
        try:
            torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        except OSError as err:
            error = err
        dist.barrier()
        if dist.is_rank0():
            try:
                save_model(model, os.path.join(tmp, "model.safetensors"))
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
                torch.save({"scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else {}},
                           os.path.join(tmp, "scheduler.pt"))
                with open(os.path.join(tmp, "state.json"), "w") as fh:
                    json.dump({**state, "config": self.fingerprint, "time": time.time()}, fh, indent=1)
                self._finalise(tmp, final, name)
            except (OSError, KDError) as err:  # disk full, permissions, a bad read-back: keep the
                error = error or err                  # previous checkpoint intact (and `latest` on it)
                shutil.rmtree(tmp, ignore_errors=True)
        errors = [error]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(errors, src=0)
        if errors[0] is not None or error is not None:
            err = errors[0] or error
            raise KDError(f"could not save checkpoint {final}: {err}. The previous checkpoint "
                          f"(see {self.run_dir}/latest) is intact; free disk space and resume "
                          f"with train.resume=auto.")
        return final if dist.is_rank0() else None

    def _finalise(self, tmp: str, final: str, name: str) -> None:
        files = {}
        for fname in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, fname)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[fname] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        write_text_atomic(os.path.join(tmp, "manifest.json"), json.dumps({"files": files}, indent=1))
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.run_dir)
        try:
            verify(final)  # only a checkpoint that reads back intact becomes `latest`
        except KDError:
            shutil.rmtree(final, ignore_errors=True)  # never resume from it; the previous one stays
            raise
        write_text_atomic(os.path.join(self.run_dir, "latest"), name + "\n")
        self._prune(keep=name)

    def _prune(self, keep: str) -> None:
        steps = self.step_dirs()
        for old in steps[self.keep_last:]:
            if old != keep:
                shutil.rmtree(os.path.join(self.run_dir, old), ignore_errors=True)

    # ---- resuming -----------------------------------------------------------------------
    def step_dirs(self):
        if not os.path.isdir(self.run_dir):
            return []
        names = [n for n in os.listdir(self.run_dir) if STEP_DIR.match(n)]
        return sorted(names, key=lambda n: int(STEP_DIR.match(n).group(1)), reverse=True)

    def find_resumable(self, resume: str) -> Optional[str]:
        """Newest checkpoint that verifies; warns about (and skips) corrupt ones."""
        if resume == "none":
            return None
        if resume != "auto":
            verify(resume)
            return resume
        for name in self.step_dirs():
            folder = os.path.join(self.run_dir, name)
            try:
                verify(folder)
                return folder
            except KDError as err:
                log.warning("skipping corrupt checkpoint: %s; falling back to an older one", err)
        return None

    def load(self, folder: str, model, optimizer, scheduler, scaler) -> dict:
        with open(os.path.join(folder, "state.json")) as fh:
            state = json.load(fh)
        if state.get("config") != self.fingerprint:
            diff = config_diff(state.get("config") or {}, self.fingerprint)
            shown = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in diff[:8])
            raise KDError(f"checkpoint {folder} comes from another config (differs in: {shown}"
                          f"{'; ...' if len(diff) > 8 else ''}). Use a new run_name, or "
                          f"train.resume=none to start over.")
        load_model(model, os.path.join(folder, "model.safetensors"))
        optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
        sched = torch.load(os.path.join(folder, "scheduler.pt"), weights_only=True)
        scheduler.load_state_dict(sched["scheduler"])
        if scaler is not None and sched["scaler"]:
            scaler.load_state_dict(sched["scaler"])
        rank = int(os.environ.get("RANK", "0"))
        rng_path = os.path.join(folder, f"rng_rank{rank}.pt")
        if os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=True))
        else:
            log.warning("%s has no RNG state for rank %d (world size changed?); dropout will differ",
                        folder, rank)
        return state


def export_dir_for(run_dir: str, tag: Optional[str] = None) -> str:
    """<run_dir>/final, or <run_dir>/export_<tag> for a copy exported during training."""
    return os.path.join(run_dir, "final" if tag is None else f"export_{tag}")


def export_pretrained(model, tokenizer, out_dir: str) -> None:
    """Hugging Face folder (config, safetensors, tokenizer), swapped in atomically."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
