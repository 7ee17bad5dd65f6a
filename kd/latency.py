"""Inference latency and throughput of an exported encoder, for the benchmark table.

We time the encoder alone (`AutoModel`): task heads are a few small matmuls, and the models we
compare are exported with different heads (MLM, classification or none).
"""
import contextlib
import statistics
import time

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


def median_forward_seconds(model, batch: dict, repeats: int, warmup: int) -> float:
    """Median wall time of one forward pass; CUDA is synchronised so we time the kernels, not the launch."""
    device = batch["input_ids"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**batch)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model(**batch)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(model_dir, device: str = "auto", repeats: int = 10, warmup: int = 3,
                    seq_len: int = 128) -> dict:
    """Batch-1 latency (ms) and batch-32 throughput (sequences/s) of a Hugging Face model folder.

    Random token ids from the model's vocabulary, full attention mask, fp32, median of `repeats`
    timed passes after `warmup` untimed ones. On CPU the current torch thread count is used as is.
    """
    if repeats < 1:
        raise KDError(f"repeats must be at least 1, got {repeats}")
    dev = resolve_device(device)
    model = load_encoder(model_dir, dev)
    seq_len = min(seq_len, model.config.max_position_embeddings)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    b1 = median_forward_seconds(model, random_batch(vocab, 1, seq_len, dev, generator), repeats, warmup)
    bn = median_forward_seconds(model, random_batch(vocab, THROUGHPUT_BATCH, seq_len, dev, generator),
                                repeats, warmup)
    result = {
        "latency_ms_b1": b1 * 1e3,
        "throughput_seq_s_b32": THROUGHPUT_BATCH / bn,
        "repeats": repeats,
        "warmup": warmup,
        "seq_len": seq_len,
        "device": describe_device(dev),
        "encoder_parameters": sum(p.numel() for p in model.parameters()),
    }
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result
