"""How the loop computes: autocast (AMP on CUDA only), AdamW with BERT's weight-decay groups, and the
warmup + linear / cosine / constant learning-rate schedule. Shared by the engine and the benches."""
import contextlib
import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def autocast_for(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA only; on CPU fp32 is ~5x faster than bf16 matmuls here."""
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    if amp in ("bf16", "fp16") and not _warned_cpu_amp:
        _warned_cpu_amp.append(amp)  # once per process: both entry scripts and the benches call this
        log.info("train.amp=%s applies on CUDA only: this %s run computes in fp32 (faster on CPU); "
                 "set train.amp=none to silence this", amp, device.type)
    return contextlib.nullcontext


_warned_cpu_amp: list = []


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (the BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6,
                             fused=device.type == "cuda")


def build_scheduler(optimizer, cfg, total_steps: int):
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
