"""Checkpoints that a crash cannot corrupt, exact resume, and Hugging Face export.

Layout of `checkpoints/<run_name>/`:
    step_000400/          model.safetensors, optimizer.pt, scheduler.pt, state.json,
                          rng_rank<r>.pt (one per rank), manifest.json (sha256 of every file)
    latest                name of the newest verified checkpoint
    final/                the exported student (from_pretrained-ready) with its tokenizer

A checkpoint is written into a temporary folder, fsynced and renamed, then re-read and verified
against its manifest, and only then named in `latest`; older ones are pruned after that. Weights
are safetensors and the rest loads with `torch.load(weights_only=True)` or JSON: nothing is
unpickled. state.json also holds what the run resuming from it must match (Checkpointer.load).
A write that fails (a full disk) or a checkpoint that does not read back intact leaves the previous
one as it was; when none verifies, resuming stops with an error rather than starting over.
"""
import json
import logging
import os
import re
import shutil
import time
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from kd import dist, fault_points
from kd.errors import KDError
from kd.integrity import fsync_dir, reason, sha256_file, space_note, write_text_atomic

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
# torch.save and safetensors report a failed write (disk full, file size limit) as RuntimeError and
# SafetensorError rather than OSError
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def checkpoint_bytes(*states) -> int:
    """Bytes of the distinct tensors in (nested) state dicts: about what a checkpoint takes on disk."""
    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)
    unique = {t.data_ptr(): t.numel() * t.element_size() for s in states for t in tensors(s)}
    return sum(unique.values())


class _WriteFailed(Exception):
    def __init__(self, path: str, err: BaseException):
        super().__init__(f"{path}: {err}")
        self.path, self.err = path, err


def _write(path: str, write) -> None:
    """write(path), with a failure (disk full, ...) reported with the file it was writing."""
    try:
        write(path)
    except WRITE_ERRORS as err:
        raise _WriteFailed(path, err) from err


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
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise KDError(f"{manifest_path}: unreadable manifest ({err})") from None
    try:
        files = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in manifest["files"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise KDError(f"{manifest_path}: malformed manifest ({type(err).__name__}: {err})") from None
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise KDError(f"{manifest_path}: does not list {', '.join(missing)} (incomplete or foreign)")
    for name, (size, sha256) in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise KDError(f"{path}: missing")
        if os.path.getsize(path) != size:
            raise KDError(f"{path}: truncated ({os.path.getsize(path)} of {size} bytes)")
        if sha256_file(path) != sha256:
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


def _differences(saved: dict, current: dict) -> str:
    diff = config_diff(saved, current)
    shown = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in diff[:8])
    return shown + ("; ..." if len(diff) > 8 else "")


def _refuse_if_different(folder: str, what: str, saved: dict, current: dict, fix: str) -> None:
    if saved != current:
        raise KDError(f"checkpoint {folder} {what} (differs in: {_differences(saved, current)}). {fix}")


class Checkpointer:
    """`config_fingerprint`: what makes a checkpoint loadable into this model at all (architecture,
    teacher); `identity`: the whole config less what a resume may change (kd.integrity.run_identity).
    Both are saved in state.json and must match on load: a checkpoint of another run is refused by name."""

    def __init__(self, run_dir: str, keep_last: int, config_fingerprint: dict, identity: Optional[dict] = None):
        self.run_dir = run_dir
        self.keep_last = keep_last
        self.fingerprint = config_fingerprint
        self.identity = identity

    # ---- saving -------------------------------------------------------------------------
    def save(self, model: torch.nn.Module, optimizer, scheduler, scaler, state: dict) -> Optional[str]:
        """Collective: every rank calls it. Returns the checkpoint folder on rank 0.

        If any file cannot be written (a full disk, a file size limit) or the checkpoint does not
        read back intact, what this save wrote is removed, the previous checkpoint and `latest`
        stay as they were, and every rank raises the same one-line KDError."""
        name = f"step_{state['step']:06d}"
        final = os.path.join(self.run_dir, name)
        tmp = os.path.join(self.run_dir, f".tmp-{name}")
        if dist.is_rank0():
            os.makedirs(self.run_dir, exist_ok=True)
            self._remove_unfinished()
            os.makedirs(tmp)
        dist.barrier()
        rank = int(os.environ.get("RANK", "0"))
        problem = self._attempt(final, model, optimizer, lambda: _write(
            os.path.join(tmp, f"rng_rank{rank}.pt"), lambda path: torch.save(rng_state(), path)))
        fault_points.reached("checkpoint.rank_state_written")
        problems = [p for p in dist.all_gather_object(problem) if p]  # rank 0 goes on only if all wrote theirs
        if dist.is_rank0() and not problems:
            problem = self._attempt(final, model, optimizer, lambda: self._write_shared(
                tmp, final, name, model, optimizer, scheduler, scaler, state))
            problems = [problem] if problem else []
        if dist.is_rank0() and problems:
            shutil.rmtree(tmp, ignore_errors=True)
        box = [problems[0] if problems else None]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(box, src=0, group=dist.control_group())
        if box[0] is not None:
            raise KDError(box[0])
        return final if dist.is_rank0() else None

    def _attempt(self, final: str, model, optimizer, work) -> Optional[str]:
        """None if work() succeeds, else the message every rank will raise."""
        try:
            work()
            return None
        except _WriteFailed as failed:
            needed = checkpoint_bytes(model.state_dict(), optimizer.state_dict())
            detail = f"writing {failed.path} failed ({reason(failed.err)}); {space_note(failed.path, needed)}"
        except (OSError, KDError) as err:  # a bad read-back, an fsync or rename that failed
            detail = str(err)
        latest = self.latest()
        return (f"could not save checkpoint {final}: {detail}. The previous checkpoint "
                f"({latest or 'none yet'}) is intact; free disk space and resume with train.resume=auto.")

    def _write_shared(self, tmp: str, final: str, name: str, model, optimizer, scheduler, scaler,
                      state: dict) -> None:
        """Rank 0: the weights, optimizer, scheduler and loop state, then the manifest and rename."""
        _write(os.path.join(tmp, "model.safetensors"), lambda path: save_model(model, path))
        fault_points.reached("checkpoint.model_written")
        _write(os.path.join(tmp, "optimizer.pt"), lambda path: torch.save(optimizer.state_dict(), path))
        _write(os.path.join(tmp, "scheduler.pt"), lambda path: torch.save(
            {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {}}, path))
        saved = {**state, "config": self.fingerprint, "time": time.time()}
        if self.identity is not None:
            saved["identity"] = self.identity
        _write(os.path.join(tmp, "state.json"), lambda path: write_text_atomic(path, json.dumps(saved, indent=1)))
        fault_points.reached("checkpoint.files_written")
        self._finalise(tmp, final, name)

    def _finalise(self, tmp: str, final: str, name: str) -> None:
        files = {}
        for fname in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, fname)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[fname] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
        manifest = os.path.join(tmp, "manifest.json")
        _write(manifest, lambda path: write_text_atomic(path, json.dumps({"files": files}, indent=1)))
        fsync_dir(tmp)
        fault_points.reached("checkpoint.manifest_written")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.run_dir)
        fault_points.reached("checkpoint.renamed")
        try:
            verify(final)  # only a checkpoint that reads back intact becomes `latest`
        except KDError:
            shutil.rmtree(final, ignore_errors=True)  # never resume from it; the previous one stays
            raise
        _write(os.path.join(self.run_dir, "latest"), lambda path: write_text_atomic(path, name + "\n"))
        fault_points.reached("checkpoint.latest_written")
        self._prune(keep=name)

    def _remove_unfinished(self) -> None:
        """Temporary folders of saves that a crash interrupted: never resumed from, so never kept."""
        for entry in os.listdir(self.run_dir):
            if entry.startswith(".tmp-step_"):
                shutil.rmtree(os.path.join(self.run_dir, entry), ignore_errors=True)

    def latest(self) -> Optional[str]:
        try:
            with open(os.path.join(self.run_dir, "latest")) as fh:
                return os.path.join(self.run_dir, fh.read().strip())
        except OSError:
            return None

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
        """Newest checkpoint that verifies; warns about (and skips) corrupt ones. When checkpoints
        exist but none verifies, the run stops rather than silently starting over."""
        if resume == "none":
            return None
        if resume != "auto":
            verify(resume)
            return resume
        problems = []
        for name in self.step_dirs():
            folder = os.path.join(self.run_dir, name)
            try:
                verify(folder)
                return folder
            except KDError as err:
                log.warning("skipping corrupt checkpoint: %s; falling back to an older one", err)
                problems.append(str(err))
        if problems:
            raise KDError(f"none of the {len(problems)} checkpoint(s) in {self.run_dir} verifies (newest: "
                          f"{problems[0]}). Restore a good copy, or start over with train.resume=none.")
        return None

    def load(self, folder: str, model, optimizer, scheduler, scaler, named: bool = False) -> dict:
        """`named`: the user named this checkpoint (train.resume=<folder>), so it may continue with
        other settings (say a lower train.lr), which are logged; under train.resume=auto a checkpoint
        whose settings differ is taken for another run's and refused. The model's shape must match."""
        with open(os.path.join(folder, "state.json")) as fh:
            state = json.load(fh)
        _refuse_if_different(folder, "comes from another config", state.get("config") or {}, self.fingerprint,
                             "Use a new run_name, or train.resume=none to start over.")
        if self.identity is not None and "identity" in state:  # checkpoints from before identities: no check
            if named and state["identity"] != self.identity:
                log.warning("resuming %s with other settings (%s)", folder,
                            _differences(state["identity"], self.identity))
            elif not named:
                _refuse_if_different(folder, "belongs to another run", state["identity"], self.identity,
                                     f"Use a new run_name, train.resume=none to start over, or continue this run "
                                     f"with the new settings by naming it: train.resume={folder}")
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
