"""Inference latency and throughput of an exported encoder, for the benchmark table.

We time the encoder alone (`AutoModel`): task heads are a few small matmuls, and the models we
compare are exported with different heads (MLM, classification or none).
"""
import contextlib
import statistics
from typing import List, Sequence, Tuple

import torch

from kd.errors import KDError

THROUGHPUT_BATCH = 32


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when a GPU is visible; asking for CUDA without one is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KDError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise KDError(f"unknown device '{device}'; use auto, cpu or cuda")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@contextlib.contextmanager
def _quiet_transformers():
    # Loading an MLM export into AutoModel reports the unused head and a fresh pooler, with a
    # progress bar; all expected here, and they would bury the report's own messages.
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_encoder(model_dir, device: torch.device, dtype: torch.dtype = torch.float32):
    from transformers import AutoModel  # imported lazily: report-only users never pay for it

    with _quiet_transformers():
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype)
    return model.eval().to(device)


def random_batch(vocab_size: int, batch_size: int, seq_len: int, device, generator) -> dict:
    input_ids = torch.randint(vocab_size, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _quartiles(values: List[float]) -> Tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def measure_latencies(model_dirs: Sequence, device: str = "auto", repeats: int = 10, warmup: int = 1,
                      seq_len: int = 128, min_run_time: float = 0.3) -> List[dict]:
    """Batch-1 latency (ms) and batch-32 throughput (sequences/s) of Hugging Face model folders,
    timed round robin so that load from other programs falls on every model alike.

    Each of `repeats` rounds (after `warmup` untimed ones) times every model at both batch sizes
    with torch.utils.benchmark (`blocked_autorange`: as many calls as fill `min_run_time`, CUDA
    synchronised, the current thread count); we report the median over rounds and the IQR.
    Random token ids from each model's vocabulary, full attention mask, fp32, inference mode.
    A folder that cannot be loaded gets {"error": why} in its place.

    min_run_time 0.3 s, not less: on the 2-core CPU, batch-1 calls (~22 ms) come in two speeds
    (about 22 and 29 ms) for stretches of a second or so. With 0.1 s blocks one of three reports
    put two copies of the same model 30% apart; with 0.3 s, three of three agreed within 1.2%.
    """
    from torch.utils.benchmark import Timer

    if repeats < 1:
        raise KDError(f"repeats must be at least 1, got {repeats}")
    dev = resolve_device(device)
    models, failed = [], {}
    for index, folder in enumerate(model_dirs):
        try:
            models.append(load_encoder(folder, dev))
        except Exception as err:  # noqa: BLE001 - reported per model; one bad folder must not stop the rest
            failed[index] = f"could not be loaded ({err})"
    lengths = [min(seq_len, m.config.max_position_embeddings) for m in models]
    generator = torch.Generator().manual_seed(0)
    calls = []  # per model: {batch size: a no-argument forward}
    for model, length in zip(models, lengths):
        per_size = {}
        for size in (1, THROUGHPUT_BATCH):
            batch = random_batch(model.config.vocab_size, size, length, dev, generator)
            per_size[size] = Timer(stmt="forward()", globals={"forward": _forward(model, batch)},
                                   num_threads=torch.get_num_threads())
        calls.append(per_size)
    seconds = [{size: [] for size in per_size} for per_size in calls]
    for round_index in range(warmup + repeats):
        order = list(zip(calls, seconds))
        for per_size, timed in order if round_index % 2 else order[::-1]:  # no model always goes first
            for size, timer in per_size.items():
                median = timer.blocked_autorange(min_run_time=min_run_time).median
                if round_index >= warmup:
                    timed[size].append(median)
    results = []
    for model, length, timed in zip(models, lengths, seconds):
        b1 = [t * 1e3 for t in timed[1]]
        bn = [THROUGHPUT_BATCH / t for t in timed[THROUGHPUT_BATCH]]
        (b1_q1, b1_med, b1_q3), (bn_q1, bn_med, bn_q3) = _quartiles(b1), _quartiles(bn)
        results.append({"latency_ms_b1": b1_med, "latency_ms_b1_iqr": b1_q3 - b1_q1,
                        "throughput_seq_s_b32": bn_med, "throughput_seq_s_b32_iqr": bn_q3 - bn_q1,
                        "repeats": repeats, "warmup": warmup, "seq_len": length, "device": describe_device(dev),
                        "encoder_parameters": sum(p.numel() for p in model.parameters())})
    del models, calls
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for index in sorted(failed):  # back in the order asked for
        results.insert(index, {"error": failed[index]})
    return results


def _forward(model, batch: dict):
    def forward():
        with torch.inference_mode():
            model(**batch)
    return forward


def measure_latency(model_dir, device: str = "auto", repeats: int = 10, warmup: int = 1,
                    seq_len: int = 128) -> dict:
    """measure_latencies for one model folder."""
    result = measure_latencies([model_dir], device, repeats, warmup, seq_len)[0]
    if "error" in result:
        raise KDError(f"{model_dir}: {result['error']}")
    return result
