"""The one training loop, for pretraining and fine-tuning alike.

It knows nothing about distillation: it gets a trainable module, a `loss_fn(model, batch) ->
(loss, {term: tensor})`, a loader, and optional evaluation and export callbacks. It owns DDP,
AMP, accumulation, clipping, the LR schedule, logging, checkpoints and exact resume.
"""
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kd import dist
from kd.checkpoint import Checkpointer
from kd.errors import KDError
from kd.logger import RunLogger, Stopwatch
from kd.optim import autocast_for, build_optimizer, build_scheduler

log = logging.getLogger(__name__)
LossFn = Callable[[nn.Module, dict], tuple]


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0    # per rank, so the sampler can skip them on resume
    tokens_seen: int = 0         # global
    skipped_steps: int = 0       # steps dropped for a non-finite loss or gradient

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}


class GracefulStop(SystemExit):
    """Raised after a signal-triggered checkpoint; the exit status is 128 + signal number."""


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the current step, saves, and exits.

    Ranks can receive the signal a step apart, so they agree through a tiny all-reduce (MAX) on
    the CPU control group every step: no GPU sync, and no rank left waiting in a collective."""

    def __init__(self):
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if not self.signum:
            log.warning("received %s: finishing the current step, then saving a checkpoint",
                        signal.Signals(signum).name)
        self.signum = signum

    def agreed(self) -> int:
        return dist.all_reduce_max_int(self.signum)

    def restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg, info: dist.DistInfo, model: nn.Module, loss_fn: LossFn, loader,
                 checkpointer: Checkpointer, log_dir: str,
                 eval_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
                 export_fn: Optional[Callable[[nn.Module, Optional[str]], None]] = None):
        self.cfg, self.info, self.loss_fn, self.loader = cfg, info, loss_fn, loader
        self.eval_fn, self.export_fn, self.checkpointer = eval_fn, export_fn, checkpointer
        self.model = model.to(info.device)
        self.optimizer = build_optimizer(self.model, cfg, info.device)
        # A loader with a state_dict is a stream (data.streaming): endless, no epochs, and each rank's
        # position in it is saved in checkpoints instead of a count of samples.
        self.stream = hasattr(loader, "state_dict")
        self.total_steps = cfg.max_steps
        if not self.stream:
            micro_per_epoch = len(loader.sampler) // cfg.batch_size
            self.steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
            if micro_per_epoch < cfg.grad_accum:
                raise KDError(f"the training set gives {micro_per_epoch} batch(es) per rank per epoch, fewer "
                              f"than train.grad_accum={cfg.grad_accum}; use more data or a smaller batch")
            if cfg.epochs:
                self.total_steps = min(cfg.max_steps, cfg.epochs * self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        use_fp16 = info.device.type == "cuda" and cfg.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
        self.autocast = autocast_for(info.device, cfg.amp)
        self.state = LoopState()
        self.last_eval = None  # (step, metrics), so the final eval is not run twice
        self.logger = RunLogger(log_dir, self.total_steps, enabled=info.is_main)
        self.wrapped = self._wrap(self.model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.info.world_size > 1:
            ids = [self.info.device.index] if self.info.device.type == "cuda" else None
            model = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    # ---- resume -------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        folder = self.checkpointer.find_resumable(self.cfg.resume)
        if folder is None:
            if self.cfg.resume == "auto":
                log.info("no checkpoint to resume from; starting at step 0")
            return
        saved = self.checkpointer.load(folder, self.model, self.optimizer, self.scheduler, self.scaler,
                                       named=self.cfg.resume != "auto")
        if self.stream:
            positions = saved.get("data_position") or []
            if len(positions) != self.info.world_size:
                raise KDError(f"checkpoint {folder} holds the stream positions of {len(positions)} process(es), "
                              f"this run has {self.info.world_size}: resume with the same number of processes")
            self.loader.load_state_dict(positions[self.info.rank])
        self.state = LoopState(step=saved["step"], epoch=saved["epoch"],
                               samples_in_epoch=saved["samples_in_epoch"], tokens_seen=saved["tokens_seen"],
                               skipped_steps=saved.get("skipped_steps", 0))
        log.info("resumed from %s (step %d, epoch %d)", folder, self.state.step, self.state.epoch)

    def save(self) -> None:
        state = self.state.to_dict()
        if self.stream:  # every rank reads its own shard: keep every rank's position
            state["data_position"] = dist.all_gather_object(self.loader.state_dict())
        folder = self.checkpointer.save(self.model, self.optimizer, self.scheduler, self.scaler, state)
        if folder:
            log.info("saved checkpoint %s", folder)

    # ---- the loop -----------------------------------------------------------------------
    def _micro_batches(self):
        """Yields (epoch_finished, batch); sets sampler/collate epoch and skips seen samples."""
        if self.stream:  # endless: it starts its next pass itself
            for batch in self.loader:
                yield False, batch
        sampler = self.loader.sampler
        while True:
            sampler.set_epoch(self.state.epoch)
            sampler.set_start(self.state.samples_in_epoch)
            if hasattr(self.loader.collate_fn, "epoch"):
                self.loader.collate_fn.epoch = self.state.epoch
            for batch in self.loader:
                yield False, batch
            yield True, None

    def _train_step(self, micro_batches) -> Optional[Dict[str, torch.Tensor]]:
        cfg = self.cfg
        terms_sum: Dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            batch = _to_device(batch, self.info.device)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not isinstance(self.wrapped, DDP) else self.wrapped.no_sync()
            with sync:
                with self.autocast():
                    loss, terms = self.loss_fn(self.wrapped, batch)
                scaled = loss / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            terms = {"loss": loss, **terms}
            for name, value in terms.items():
                value = value.detach().float() / len(micro_batches)
                terms_sum[name] = terms_sum[name] + value if name in terms_sum else value
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        terms_sum["grad_norm"] = grad_norm
        # One scalar sync per step: a NaN/inf loss or gradient must not reach the weights. (With
        # fp16 the GradScaler already skips overflowing steps and lowers its scale instead.)
        if not self.scaler and not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return terms_sum

    def _log_train(self, sums: Dict[str, torch.Tensor], count: int, seconds: float, tokens: int) -> None:
        names = sorted(sums)
        values = dist.all_reduce_mean(torch.stack([sums[n] for n in names]) / count).tolist()  # one sync
        record = {"step": self.state.step, "epoch": self.state.epoch, "tokens_seen": self.state.tokens_seen,
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(seconds, 1e-9)}
        record.update({("train/" + n if n != "grad_norm" else "grad_norm"): v for n, v in zip(names, values)})
        terms = " ".join(f"{n} {v:.4f}" for n, v in zip(names, values) if n not in ("loss", "grad_norm"))
        self.logger.write(record, console=(
            f"step {self.state.step}/{self.total_steps} | loss {record['train/loss']:.4f} | {terms} | "
            f"lr {record['lr']:.2e} | {record['tokens_per_s']:.0f} tok/s"))

    def evaluate(self) -> Dict[str, float]:
        if self.eval_fn is None:
            return {}
        if self.last_eval and self.last_eval[0] == self.state.step:
            return self.last_eval[1]
        metrics = self.eval_fn(self.wrapped)
        self.last_eval = (self.state.step, metrics)
        record = {"step": self.state.step, "epoch": self.state.epoch, "tokens_seen": self.state.tokens_seen,
                  **metrics}
        self.logger.write(record, console="eval  step {} | ".format(self.state.step) + " | ".join(
            f"{k.split('/', 1)[-1]} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _export(self, tag: Optional[str]) -> None:
        """The model as a Hugging Face folder, from rank 0: the final one (tag None) or a copy tagged
        with its step. The other ranks go on; the next collective lines them up again."""
        if self.export_fn is not None and self.info.is_main:
            self.export_fn(self.model, tag)

    def _skip_nonfinite(self) -> None:
        self.state.skipped_steps += 1
        self.consecutive_skips += 1
        self.logger.write({"step": self.state.step, "epoch": self.state.epoch,
                           "skipped_steps": self.state.skipped_steps},
                          console=f"non-finite loss or gradient after step {self.state.step}: step skipped "
                                  f"({self.consecutive_skips} in a row, {self.state.skipped_steps} in total)")
        if self.consecutive_skips >= self.cfg.max_nonfinite_skips:
            latest = self.checkpointer.step_dirs()
            raise KDError(f"stopped: {self.consecutive_skips} consecutive steps had a non-finite loss or "
                          f"gradient (after step {self.state.step}). The last good checkpoint is "
                          f"{latest[0] if latest else 'none (no checkpoint was saved yet)'} in "
                          f"{self.checkpointer.run_dir}. Lower train.lr, check the data, or use "
                          f"train.amp=bf16 instead of fp16.")

    def fit(self) -> Dict[str, float]:
        self.stop_request = StopRequest()
        self.consecutive_skips = 0
        try:
            return self._fit()
        finally:
            self.stop_request.restore()

    def _fit(self) -> Dict[str, float]:
        """Step, log, evaluate, export, save, stop: each a helper below, in that order."""
        state = self.state
        self.wrapped.train()
        batches = self._micro_batches()
        window = _LogWindow()
        self.last_saved = state.step
        while state.step < self.total_steps:
            micro = self._next_accumulation(batches)
            if micro is None:  # the epoch ended
                if self._end_epoch():
                    break
                continue
            terms = self._train_step(micro)
            state.samples_in_epoch += sum(len(b["input_ids"]) for b in micro)
            if terms is None:
                self._skip_nonfinite()
                continue
            self._count_step(micro, terms, window)
            self._log_eval_export_save(window)
            self._stop_if_asked()
        return self._finish()

    def _next_accumulation(self, batches) -> Optional[list]:
        """The next train.grad_accum micro-batches, or None when the epoch ends first (a partial
        accumulation at the epoch's end is dropped, as drop_last does)."""
        micro = []
        while len(micro) < self.cfg.grad_accum:
            finished, batch = next(batches)
            if finished:
                return None
            micro.append(batch)
        return micro

    def _end_epoch(self) -> bool:
        """Count the epoch (evaluating if asked per epoch); True when train.epochs are done."""
        self.state.epoch += 1
        self.state.samples_in_epoch = 0
        if self.cfg.eval_every_epoch:
            self.evaluate()
            self.wrapped.train()
        return bool(self.cfg.epochs and self.state.epoch >= self.cfg.epochs)

    def _count_step(self, micro: list, terms: Dict[str, torch.Tensor], window: "_LogWindow") -> None:
        self.consecutive_skips = 0
        tokens = sum(b["input_ids"].numel() for b in micro) * self.info.world_size
        self.state.step += 1
        self.state.tokens_seen += tokens
        window.add(terms, tokens)
        self.logger.advance(self.state.step)

    def _log_eval_export_save(self, window: "_LogWindow") -> None:
        """Whatever is due after this step; the last step's eval, save and export are _finish's."""
        cfg, step = self.cfg, self.state.step
        if step % cfg.log_every == 0 or step == self.total_steps:
            self._log_train(*window.flush())
        if step == self.total_steps:
            return
        if cfg.eval_every and step % cfg.eval_every == 0:
            self.evaluate()
            self.wrapped.train()
        if step in cfg.export_steps:
            self._export(f"step_{step:06d}")
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()
            self.last_saved = step

    def _stop_if_asked(self) -> None:
        """SIGTERM/SIGINT, agreed by every rank: save (if this step is not saved yet) and stop."""
        signum = self.stop_request.agreed()
        if not signum:
            return
        step = self.state.step
        if step != self.last_saved:
            self.save()
        self.logger.write({"step": step, "stopped_by_signal": signum},
                          console=f"stopped by {signal.Signals(signum).name} after step {step}; "
                                  f"checkpoint saved. Continue with train.resume=auto.")
        self.logger.close()
        raise GracefulStop(128 + signum)

    def _finish(self) -> Dict[str, float]:
        metrics = self.evaluate()
        if self.state.step != self.last_saved or self.cfg.save_every == 0:
            self.save()
        self._export(None)
        dist.barrier()
        self.logger.close()
        return metrics


class _LogWindow:
    """Loss terms and tokens summed over the steps since the last train log, and the time they took."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = self.tokens = 0
        self.watch = Stopwatch()

    def add(self, terms: Dict[str, torch.Tensor], tokens: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1
        self.tokens += tokens

    def flush(self) -> tuple:
        """(sums, steps, seconds, tokens) for _log_train, and a fresh window."""
        out = (self.sums, self.count, self.watch.lap(), self.tokens)
        self.sums, self.count, self.tokens = {}, 0, 0
        return out
