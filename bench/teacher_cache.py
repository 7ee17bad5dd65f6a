"""Offline teacher cache: step throughput from the cache against online distillation, and its cost.

Everything runs in this process on random weights of the right shapes (no download), with kd's
own code paths:

- generation: kd.teacher_cache.generate on a few batches of blocks (teacher forward, top-k and
  log-sum-exp, shard write, sha256), into a temporary folder; gives teacher blocks/s;
- online:  kd.objective.distill_loss with the live teacher, MLM CE + KL (the same terms the cache
           gives); "online+hidden" adds the hidden-state losses of the default recipe, for context;
- cache:   CachedTeacherCollate (masking + row look-up from the memory-mapped shards) and
           distill_loss with the cached top-k KL (loss.topk_mode), the student only in memory.
Each timed step is a whole step: collate, forwards, losses, backward, clipping and AdamW. Variants
are interleaved, so background load hits them alike; the median step is reported.

    .venv/bin/python bench/teacher_cache.py --preset demo
    .venv/bin/python bench/teacher_cache.py --preset bert-large            # batch 4 on CPU
    .venv/bin/python bench/teacher_cache.py --preset bert-large --device cuda

It also projects the cache for WikiText-103 (--corpus-tokens, 103M by default): size per cached
epoch (mask draw) and generation time at the measured teacher throughput. The last line printed
is `cache/online step ratio: X.XX` (cache tokens/s over online tokens/s, same loss terms).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from bench.distill_throughput import PRESETS, Preset, forward_flops  # noqa: E402  (shared shapes)
from bench.step_timing import sync  # noqa: E402
from kd import dist  # noqa: E402
from kd.config import LossConfig, PretrainConfig, StudentConfig, TrainConfig, load_config  # noqa: E402
from kd.data.loader import MLMCollate  # noqa: E402
from kd.data.masking import masking_spec_for, num_predictions  # noqa: E402
from kd.optim import autocast_for, build_optimizer  # noqa: E402
from kd.models import DistillationStudent, build_student, default_hidden_map, load_tokenizer  # noqa: E402
from kd.objective import distill_loss, make_plan  # noqa: E402
from kd.teacher_cache.format import bytes_per_position  # noqa: E402
from kd.teacher_cache.generate import generate  # noqa: E402
from kd.teacher_cache.read import CachedTeacherCollate, TeacherCache  # noqa: E402


class Step:
    """Engine._train_step with grad_accum=1: collate, autocast, distill_loss, backward, clip, AdamW."""

    def __init__(self, module, teacher, plan, collate, items, device):
        self.module, self.teacher, self.plan, self.collate, self.items = module, teacher, plan, collate, items
        self.device = device
        self.train_cfg = TrainConfig()
        self.optimizer = build_optimizer(module, self.train_cfg, device)
        self.autocast = autocast_for(device, self.train_cfg.amp)

    def __call__(self) -> None:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.collate(self.items).items()}
        with self.autocast():
            loss, _ = distill_loss(self.module, self.teacher, batch, self.plan)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.train_cfg.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def teacher_gflop_per_block(preset: Preset) -> float:
    """Matmul FLOPs of the teacher forward for one block, head at the masked positions only."""
    return forward_flops(preset.layers, preset.hidden, preset.ffn, preset.seq_len, preset.seq_len,
                         num_predictions(preset.seq_len, 0.15)) / 1e9


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def run(args, preset: Preset, device: torch.device, batch_size: int) -> dict:
    tokenizer = load_tokenizer("packaged-minilm")  # the real bert-base-uncased vocab, shipped in a package
    vocab = len(tokenizer)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
                        num_attention_heads=preset.heads, intermediate_size=preset.ffn,
                        max_position_embeddings=max(512, preset.seq_len))
    config._attn_implementation = "sdpa"
    teacher = BertForMaskedLM(config)
    student = build_student(StudentConfig(num_layers=preset.student_layers), teacher, vocab)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as kd.models.load_teacher
    teacher = teacher.to(device=device, dtype=teacher_dtype).eval().requires_grad_(False)

    n_blocks = max(2 * batch_size, 8)
    gen = np.random.default_rng(0)
    blocks = gen.integers(1000, vocab, (n_blocks, preset.seq_len)).astype(np.uint16)
    blocks[:, 0], blocks[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    val = blocks[:batch_size].copy()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(PretrainConfig, None, [
            "run_name=bench", f"teacher_cache.path={tmp}/cache", f"teacher_cache.topk={args.topk}",
            f"teacher_cache.shard_blocks={batch_size}", f"teacher_cache.batch_size={batch_size}",
            f"data.seq_len={preset.seq_len}", "loss.alpha_hidden=0", f"loss.temperature={LossConfig().temperature}",
            f"loss.topk_mode={args.topk_mode}", "teacher.name=random-weights"])
        info = dist.DistInfo(0, 1, 0, device)
        sync(device)
        start = time.perf_counter()
        generate(cfg, info, teacher, tokenizer, {"train": blocks, "validation": val}, "random-weights")
        sync(device)
        gen_s = time.perf_counter() - start
        gen_blocks = n_blocks + len(val)
        cache = TeacherCache(cfg.teacher_cache.path)
        stored = sum(s["size"] for s in cache.manifest["shards"].values())

        items = [(i, torch.from_numpy(blocks[i].astype(np.int64))) for i in range(batch_size)]
        spec = masking_spec_for(tokenizer, cfg.data)
        pairs = default_hidden_map(preset.layers, preset.student_layers, include_embeddings=False)
        online_plan = make_plan(LossConfig(alpha_hidden=0), [])
        hidden_plan = make_plan(LossConfig(), pairs)
        cache_plan = make_plan(LossConfig(alpha_hidden=0, topk_mode=args.topk_mode), [], from_cache=True)
        variants = {
            "online": Step(DistillationStudent(copy.deepcopy(student), [], None).to(device), teacher, online_plan,
                           MLMCollate(spec), items, device),
            "online+hidden": Step(DistillationStudent(copy.deepcopy(student), pairs, preset.hidden).to(device),
                                  teacher, hidden_plan, MLMCollate(spec), items, device),
            "cache": Step(DistillationStudent(copy.deepcopy(student), [], None).to(device), None, cache_plan,
                          CachedTeacherCollate(spec, cache, "train"), items, device),
        }
        if args.skip_hidden:
            del variants["online+hidden"]
        for step in variants.values():
            for _ in range(args.warmup):
                step()
        times = {name: [] for name in variants}
        for _ in range(args.steps):
            for name, step in variants.items():
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
                times[name].append(time.perf_counter() - start)

    tokens = batch_size * preset.seq_len
    results = {name: {"step_ms": 1000 * statistics.median(t), "tokens_per_s": tokens / statistics.median(t),
                      "step_ms_all": [round(1000 * x, 1) for x in t]} for name, t in times.items()}
    predictions = num_predictions(preset.seq_len, 0.15)
    per_position = bytes_per_position(args.topk, vocab)
    body = preset.seq_len - 2  # corpus tokens per block ([CLS] and [SEP] are added)
    per_corpus_token = per_position * predictions / body
    wt_blocks = args.corpus_tokens / body
    blocks_per_s = gen_blocks / gen_s
    report = {
        "preset": args.preset, "device": device.type, "batch_size": batch_size, "seq_len": preset.seq_len,
        "topk": args.topk, "topk_mode": args.topk_mode, "threads": torch.get_num_threads(),
        "variants": results, "ratio": results["cache"]["tokens_per_s"] / results["online"]["tokens_per_s"],
        "ratio_vs_online_hidden": (results["cache"]["tokens_per_s"] / results["online+hidden"]["tokens_per_s"]
                                   if "online+hidden" in results else None),
        "teacher_param_bytes": param_bytes(teacher), "student_param_bytes": param_bytes(student),
        "masked_positions_per_block": predictions, "bytes_per_masked_position": per_position,
        "bytes_per_corpus_token": per_corpus_token, "bytes_stored_measured": stored,
        "bytes_stored_per_block_measured": stored / gen_blocks,
        "generation": {"blocks": gen_blocks, "seconds": gen_s, "blocks_per_s": blocks_per_s,
                       "tokens_per_s": blocks_per_s * preset.seq_len,
                       "teacher_gflop_per_block": teacher_gflop_per_block(preset)},
        "wikitext103": {"corpus_tokens": args.corpus_tokens, "blocks_per_epoch": wt_blocks,
                        "cache_bytes_per_epoch": wt_blocks * predictions * per_position,
                        "generation_hours_per_epoch": wt_blocks / blocks_per_s / 3600,
                        "assumed_tflops": args.assume_tflops,
                        "generation_hours_per_epoch_at_assumed_tflops":
                            wt_blocks * teacher_gflop_per_block(preset) / (args.assume_tflops * 1e3) / 3600},
        "steps": args.steps, "warmup": args.warmup,
    }
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--topk-mode", choices=["renormalize", "lse_tail"], default="renormalize")
    parser.add_argument("--corpus-tokens", type=float, default=103e6, help="for the projection (WikiText-103)")
    parser.add_argument("--assume-tflops", type=float, default=400.0,
                        help="sustained teacher TFLOP/s for a second, assumed (not measured) projection; "
                             "400 ~ an H100 in bf16 at ~40%% MFU")
    parser.add_argument("--skip-hidden", action="store_true", help="leave out the online+hidden variant")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default=os.path.join("logs", "bench"))
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    batch_size = args.batch_size or (preset.batch_cuda if device.type == "cuda" else preset.batch_cpu)
    args.steps = args.steps if args.steps is not None else preset.steps
    args.warmup = args.warmup if args.warmup is not None else preset.warmup
    if batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.topk < 1:
        parser.error("--batch-size, --steps and --topk must be >= 1, --warmup >= 0")
    print(f"preset {args.preset}: teacher {preset.layers}x{preset.hidden}, student {preset.student_layers}x"
          f"{preset.hidden}, seq {preset.seq_len}, batch {batch_size}, k={args.topk} ({args.topk_mode}), "
          f"device {device} ({torch.get_num_threads()} threads), {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)
    r = run(args, preset, device, batch_size)
    for name, v in r["variants"].items():
        print(f"{name:14s} {v['tokens_per_s']:9.0f} tokens/s | step {v['step_ms']:8.1f} ms "
              f"(median of {v['step_ms_all']})")
    print(f"weights in memory: online {(r['teacher_param_bytes'] + r['student_param_bytes']) / 2 ** 20:.0f} MB "
          f"(teacher + student), cache {r['student_param_bytes'] / 2 ** 20:.0f} MB (student)")
    g, w = r["generation"], r["wikitext103"]
    print(f"generation: {g['blocks']} blocks in {g['seconds']:.1f} s = {g['blocks_per_s']:.1f} blocks/s "
          f"({g['tokens_per_s']:.0f} tokens/s; teacher forward, top-k, write, sha256)")
    print(f"stored: {r['bytes_per_masked_position']} B per masked position (k={args.topk}: ids uint16 + "
          f"log-probs fp16 + lse fp32 + position uint16) x {r['masked_positions_per_block']} per block = "
          f"{r['bytes_per_corpus_token']:.1f} B per corpus token; measured "
          f"{r['bytes_stored_per_block_measured']:.0f} B per block with .npy headers")
    print(f"WikiText-103 projection ({w['corpus_tokens'] / 1e6:.0f}M corpus tokens, "
          f"{w['blocks_per_epoch'] / 1e3:.0f}k blocks): {w['cache_bytes_per_epoch'] / 1e9:.2f} GB and "
          f"{w['generation_hours_per_epoch']:.1f} h of generation per cached epoch at the measured "
          f"{g['blocks_per_s']:.1f} blocks/s on {device} (x teacher_cache.epochs; / the number of ranks)")
    print(f"  assumed, not measured: {g['teacher_gflop_per_block']:.1f} teacher GFLOP per block at "
          f"{args.assume_tflops:.0f} TFLOP/s sustained would take "
          f"{60 * w['generation_hours_per_epoch_at_assumed_tflops']:.1f} min per cached epoch")
    if r["ratio_vs_online_hidden"] is not None:
        print(f"cache vs online with hidden-state losses (not available from a cache): "
              f"{r['ratio_vs_online_hidden']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"teacher_cache-{args.preset}-{device.type}.json")
    with open(path, "w") as fh:
        json.dump(r, fh, indent=2)
    print(f"wrote {path}")
    print(f"cache/online step ratio: {r['ratio']:.2f}")
    return r


if __name__ == "__main__":
    main()
