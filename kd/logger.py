"""Run logging on rank 0: metrics.jsonl, TensorBoard, and console lines readable under nohup."""
import json
import logging
import math
import os
import sys
import time
from typing import Dict, Optional



def setup_console_logging() -> None:
    """Timestamped lines on rank 0; other ranks only report warnings and errors."""
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "kd_console", False) for h in root.handlers):  # keep others' handlers
        handler = logging.StreamHandler(sys.stdout)
        handler.kd_console = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    for noisy in ("transformers", "datasets", "huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


class RunLogger:
    """Writes one JSON object per logged step; mirrors scalars to TensorBoard."""

    def __init__(self, log_dir: str, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.log = logging.getLogger("kd.run")
        self.bar = None
        self.writer = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir)
        if sys.stdout.isatty():  # a progress bar for people watching; plain lines for nohup logs
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def write(self, record: Dict[str, float], console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        for key, value in record.items():
            if "/" in key or key in ("lr", "tokens_per_s"):
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])
        line = console or " | ".join(f"{k} {_fmt(v)}" for k, v in record.items()
                                     if isinstance(v, (int, float)) and k not in ("time",))
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def write_run_files(log_dir: str, config_yaml: str, run_info: dict) -> None:
    """The resolved config and run.json (what compare_benchmarks.py reads) in logs/<run_name>/."""
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "config.yaml"), "w") as fh:
        fh.write(config_yaml)
    write_json(os.path.join(log_dir, "run.json"), run_info)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
