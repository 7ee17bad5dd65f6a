"""Throughput of one complete distillation training step: kd's fast path against the naive recipe.

Both variants run in this process, on the same weights, the same batch and the same device, and
each timed step is a whole step: both forwards, the losses, backward, gradient clipping and AdamW.

- ours:  DistillationStudent + kd.objective.distill_loss, SDPA attention, MLM heads only at the
         masked positions, the decoder and its CE + KL fused in chunks (kd/fused_head.py), and on
         CUDA bf16 teacher weights, bf16 autocast and fused AdamW (what ddp_main.py does by default);
- ours-allpos: the same, with KL and the MLM head at every position (the naive step's math);
- naive: bench/naive_distiller.py (DistilBERT's recipe: eager attention, full-vocab logits
         everywhere, masked_select KL over all positions, fp16 autocast on CUDA).

Weights are random (right shapes, fixed seed): throughput does not depend on what they learned.

    .venv/bin/python bench/distill_throughput.py --preset demo
    .venv/bin/python bench/distill_throughput.py --preset bert-large --device cuda
    .venv/bin/python bench/distill_throughput.py --preset demo --ddp-compare   # CPU, 2 gloo ranks
    .venv/bin/python bench/distill_throughput.py --preset demo --unfused --compile   # + ours-allpos without
        # the fused head, and ours under torch.compile: one ratio line each

The last two lines printed are `equal-math ours/naive tokens/s ratio: Y.YY` (ours with KL and the MLM
head at every position, the naive step's math) and `ours/naive tokens/s ratio: X.XX` (our default).

At ~390 lines this script is over the ~350 we aim for: it keeps the steps it compares, their shapes
and the report together so one file says what each ratio computes. How a step is timed and its
memory read is in bench/step_timing.py.
"""
import argparse
import copy
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from bench.naive_distiller import NaiveDistiller, NaiveWeights, eager_copy  # noqa: E402
from bench.step_timing import MatmulPeak, resident_bytes, sync, timed_step  # noqa: E402
from kd.config import LossConfig, StudentConfig, TrainConfig  # noqa: E402
from kd.data.masking import MaskingSpec, mask_batch, num_predictions  # noqa: E402
from kd.optim import autocast_for, build_optimizer  # noqa: E402
from kd.flops import forward_flops as kd_forward_flops  # noqa: E402
from kd.models import DistillationStudent, build_student, default_hidden_map  # noqa: E402
from kd.objective import attention_terms_for, distill_loss, make_plan  # noqa: E402

VOCAB = 30522
MASK_ID, SPECIAL_IDS = 103, (0, 100, 101, 102, 103)  # bert-base-uncased [PAD] [UNK] [CLS] [SEP] [MASK]


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    ffn: int
    student_layers: int
    seq_len: int
    batch_cpu: int
    batch_cuda: int
    steps: int      # timed steps per variant (defaults chosen to finish in a few minutes)
    warmup: int


PRESETS = {
    # for tests: seconds
    "tiny": Preset(2, 64, 2, 256, 1, 32, 4, 4, steps=3, warmup=1),
    # the offline demo: MiniLM-L6-H384-shaped teacher, 3 layers copied from it
    "demo": Preset(6, 384, 12, 1536, 3, 128, 32, 32, steps=5, warmup=1),
    # the design's target: BERT-large -> 6x1024, every 4th layer copied
    "bert-large": Preset(24, 1024, 16, 4096, 6, 128, 4, 64, steps=5, warmup=2),
}


# ---- models and batch ----------------------------------------------------------------------

def build_models(preset: Preset, device: torch.device):
    """(ours teacher, ours student module, naive teacher, naive student), all with one set of weights."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
                        num_attention_heads=preset.heads, intermediate_size=preset.ffn,
                        max_position_embeddings=max(512, preset.seq_len))
    config._attn_implementation = "sdpa"
    teacher = BertForMaskedLM(config)
    student = build_student(StudentConfig(num_layers=preset.student_layers), teacher, VOCAB)
    naive_teacher, naive_student = eager_copy(teacher), eager_copy(student)
    pairs = default_hidden_map(preset.layers, preset.student_layers, include_embeddings=False)
    module = DistillationStudent(student, pairs, teacher.config.hidden_size)
    # as kd.models.load_teacher: frozen, eval, bf16 weights on CUDA
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = teacher.to(device=device, dtype=teacher_dtype).eval().requires_grad_(False)
    return teacher, module.to(device).train(), naive_teacher.to(device), naive_student.to(device), pairs


def make_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """Full blocks ([CLS] ... [SEP], no padding) masked by kd's own masking code."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(1000, VOCAB, (batch_size, seq_len), generator=gen)
    blocks[:, 0], blocks[:, -1] = 101, 102
    spec = MaskingSpec(mask_token_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIAL_IDS, seed=seed)
    batch = mask_batch(list(blocks), list(range(batch_size)), spec, epoch=0)
    batch.pop("block_indices")
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ---- the two steps ---------------------------------------------------------------------------

class OursStep:
    """Engine._train_step with grad_accum=1: autocast, distill_loss, backward, clip, AdamW."""

    def __init__(self, module, teacher, pairs, device: torch.device, ddp_module=None, compile: bool = False,
                 loss_cfg: Optional[LossConfig] = None, fused: bool = True):
        self.train_cfg = TrainConfig()
        self.module, self.teacher, self.device = module, teacher, device
        self.wrapped = ddp_module if ddp_module is not None else module
        if compile:  # as train.compile=true: the trainable module (the teacher stays eager)
            self.wrapped = torch.compile(self.wrapped)
        loss_cfg = loss_cfg or LossConfig()
        terms = attention_terms_for(loss_cfg, teacher.config, module.student.config)
        self.plan = make_plan(loss_cfg, pairs, attention_terms=terms,
                              attention_heads=module.student.config.num_attention_heads)
        module.attention_layers = self.plan.student_attention_layers
        self.optimizer = build_optimizer(module, self.train_cfg, device)
        self.autocast = autocast_for(device, self.train_cfg.amp)
        self.fused = fused

    def step(self, batch: dict) -> torch.Tensor:
        with self.autocast():
            loss, _ = distill_loss(self.wrapped, self.teacher, batch, self.plan, fused=self.fused)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.train_cfg.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ---- useful work (the MFU numerator) ---------------------------------------------------------

def forward_flops(layers: int, hidden: int, ffn: int, seq_len: int, tokens: int, predicted: int) -> float:
    """kd.flops.forward_flops with the BERT vocabulary (the study's equal-compute plots use the same count)."""
    return kd_forward_flops(layers, hidden, ffn, seq_len, tokens, predicted, VOCAB)


def useful_flops(preset: Preset, batch_size: int) -> float:
    """MFU numerator: teacher forward + 3 x student forward (forward + backward), heads at the
    masked positions only; the same useful work for both variants, whatever they compute."""
    tokens = batch_size * preset.seq_len
    predicted = batch_size * num_predictions(preset.seq_len, 0.15)
    teacher = forward_flops(preset.layers, preset.hidden, preset.ffn, preset.seq_len, tokens, predicted)
    student = forward_flops(preset.student_layers, preset.hidden, preset.ffn, preset.seq_len, tokens, predicted)
    return teacher + 3 * student


# ---- the benchmark ---------------------------------------------------------------------------

# --attention-terms: the default step plus one attention term each (their cost beside the default)
ATTENTION_VARIANTS = {"ours+attn_kl": {"alpha_attn_kl": 1.0}, "ours+relation_kl": {"alpha_relation_kl": 1.0},
                      "ours+attn_mse": {"alpha_attn_mse": 1.0}}


def run_benchmark(preset: Preset, batch_size: int, device: torch.device, steps: int, warmup: int,
                  peak: MatmulPeak, compile: bool = False, attention_terms: bool = False,
                  unfused: bool = False) -> dict:
    teacher, module, naive_teacher, naive_student, pairs = build_models(preset, device)
    batch = to_device(make_batch(batch_size, preset.seq_len), device)
    variants = {
        "ours": OursStep(module, teacher, pairs, device),
        "naive": NaiveDistiller(naive_student, naive_teacher, NaiveWeights.from_loss_config(LossConfig()), device,
                                lr=TrainConfig().lr, weight_decay=TrainConfig().weight_decay,
                                clip=TrainConfig().clip_grad_norm),
    }
    models = {"ours": (teacher, module), "naive": (naive_teacher, naive_student)}

    def add_variant(name: str, **step_options) -> None:
        """Ours on a copy of the module (same weights; the optimizers do not interfere)."""
        copied = copy.deepcopy(module)
        variants[name] = OursStep(copied, teacher, pairs, device, **step_options)
        models[name] = (teacher, copied)

    # equal math: KL and the MLM head at every position, as the naive step computes them (same losses
    # to 1e-6, tests/test_fast_path.py)
    add_variant("ours-allpos", loss_cfg=LossConfig(kd_positions="all"))
    if unfused:  # equal math without kd/fused_head.py: the full logits, then the plain losses
        add_variant("ours-allpos-unfused", loss_cfg=LossConfig(kd_positions="all"), fused=False)
    if compile:  # the default step with train.compile=true, timed beside the eager one
        add_variant("ours-compiled", compile=True)
    if attention_terms:  # the default step plus one attention term each
        for name, alphas in ATTENTION_VARIANTS.items():
            add_variant(name, loss_cfg=LossConfig(**alphas))
    failed = {}
    for name, variant in list(variants.items()):
        try:
            for _ in range(max(warmup, 2 if name == "ours-compiled" else 0)):  # compiling happens here
                variant.step(batch)
        except Exception as err:  # a compiler that breaks is a result to report, not a crash of the bench
            if name != "ours-compiled":
                raise
            failed[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            del variants[name], models[name]
            print(f"{name}: torch.compile failed, so it is not timed: {failed[name]}", flush=True)
        sync(device)
    times = {name: [] for name in variants}
    transient = {name: 0 for name in variants}
    # interleaved, so background load on a shared machine hits both variants alike
    for _ in range(steps):
        for name, variant in variants.items():
            seconds, extra = timed_step(variant.step, batch, device)
            times[name].append(seconds)
            transient[name] = max(transient[name], extra)
        peak.probe(1)
    flops = useful_flops(preset, batch_size)
    tokens = batch_size * preset.seq_len
    results = {}
    for name, variant in variants.items():
        step_s = statistics.median(times[name])
        resident = resident_bytes(*models[name], variant.optimizer)
        results[name] = {"tokens_per_s": tokens / step_s, "step_ms": 1000 * step_s,
                         "peak_mem_mb": (resident + transient[name]) / 2 ** 20, "mfu": None,
                         "step_ms_all": [round(1000 * t, 1) for t in times[name]]}
    results.update({name: {"error": error} for name, error in failed.items()})
    return results, flops


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, preset_name: str, batch_size: int, steps: int,
                warmup: int, result_path: str) -> None:
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cpu")
        preset = PRESETS[preset_name]
        teacher, module, _, _, pairs = build_models(preset, device)
        per_rank = batch_size // world
        full = make_batch(batch_size, preset.seq_len)
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in full.items()}
        step = OursStep(module, teacher, pairs, device, ddp_module=DDP(module, gradient_as_bucket_view=True))
        for _ in range(warmup):
            step.step(batch)
        times = []
        for _ in range(steps):
            tdist.barrier()
            start = time.perf_counter()
            step.step(batch)
            tdist.barrier()
            times.append(time.perf_counter() - start)
        if rank == 0:
            with open(result_path, "w") as fh:
                json.dump({"step_s": statistics.median(times)}, fh)
    finally:
        tdist.destroy_process_group()


def ddp_compare(preset_name: str, batch_size: int, steps: int, warmup: int, single_step_s: float) -> dict:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ddp.json")
        mp.spawn(_ddp_worker, args=(2, _free_port(), preset_name, batch_size, steps, warmup, path), nprocs=2)
        with open(path) as fh:
            ddp_step_s = json.load(fh)["step_s"]
    return {"single_process_threads": torch.get_num_threads(), "single_step_ms": 1000 * single_step_s,
            "ddp_world_size": 2, "ddp_threads_per_rank": 1, "ddp_step_ms": 1000 * ddp_step_s,
            "speedup": single_step_s / ddp_step_s}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default=os.path.join("logs", "bench"), help="folder for <preset>-<device>.json")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours under torch.compile (train.compile=true), interleaved with eager")
    parser.add_argument("--unfused", action="store_true",
                        help="also time ours-allpos without the fused decoder+loss (full logits, plain losses)")
    parser.add_argument("--attention-terms", action="store_true",
                        help="also time ours + each attention term (MiniLM v1/v2, TinyBERT), interleaved")
    parser.add_argument("--ddp-compare", action="store_true",
                        help="also time ours with 2 gloo processes (1 thread each) on the same global batch (CPU)")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    batch_size = args.batch_size or (preset.batch_cuda if device.type == "cuda" else preset.batch_cpu)
    steps = args.steps if args.steps is not None else preset.steps
    warmup = args.warmup if args.warmup is not None else preset.warmup
    if steps < 1 or warmup < 0 or batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0")

    print(f"preset {args.preset}: teacher {preset.layers}x{preset.hidden} ({preset.heads} heads, FFN {preset.ffn}), "
          f"student {preset.student_layers}x{preset.hidden}, vocab {VOCAB}, seq {preset.seq_len}, batch {batch_size}, "
          f"device {device} ({torch.get_num_threads()} threads), {warmup} warm-up + {steps} timed steps per variant"
          f"{', and ours under torch.compile' if args.compile else ''}",
          flush=True)
    probe = MatmulPeak(device)
    probe.probe(5)
    results, flops = run_benchmark(preset, batch_size, device, steps, warmup, probe, compile=args.compile,
                                   attention_terms=args.attention_terms, unfused=args.unfused)
    probe.probe(5)
    peak = probe.flops
    print(f"dense matmul peak ({'bf16' if device.type == 'cuda' else 'fp32'}, best square matmul probed before, "
          f"between and after the steps): {peak / 1e12:.3f} TFLOP/s", flush=True)
    for name, r in results.items():
        if "error" in r:
            continue
        r["mfu"] = flops / (r["step_ms"] / 1000) / peak
        cost = (f" | {r['step_ms'] / results['ours']['step_ms']:.2f}x the default step" if name.startswith("ours+")
                else "")
        print(f"{name:19s}: {r['tokens_per_s']:9.0f} tokens/s | step {r['step_ms']:8.1f} ms (median of "
              f"{r['step_ms_all']}) | peak mem {r['peak_mem_mb']:8.0f} MB | MFU {100 * r['mfu']:.1f}%{cost}")
    mem_kind = ("max_memory_allocated during a step above the allocation before it" if device.type == "cuda" else
                "peak RSS during a step (sampled every 2 ms) above the RSS before it, after malloc_trim")
    print(f"peak mem = weights of its teacher + student + AdamW state + the largest transient ({mem_kind})")
    print(f"MFU = (teacher fwd + 3 x student fwd) matmul FLOPs, MLM heads at the {num_predictions(preset.seq_len, 0.15)} "
          f"masked positions only = {flops / 1e9:.1f} GFLOP per step, / step time / matmul peak")

    report = {"preset": args.preset, "device": device.type, "batch_size": batch_size, "seq_len": preset.seq_len,
              "variants": results, "ratio": results["ours"]["tokens_per_s"] / results["naive"]["tokens_per_s"],
              "equal_math_ratio": results["ours-allpos"]["tokens_per_s"] / results["naive"]["tokens_per_s"],
              "matmul_peak_tflops": peak / 1e12, "useful_gflop_per_step": flops / 1e9, "compile": args.compile,
              "peak_mem_method": mem_kind, "steps": steps, "warmup": warmup, "threads": torch.get_num_threads()}
    if "ours-allpos-unfused" in results:
        report["fused_ratio"] = (results["ours-allpos"]["tokens_per_s"]
                                 / results["ours-allpos-unfused"]["tokens_per_s"])
    if "tokens_per_s" in results.get("ours-compiled", {}):
        report["compile_ratio"] = results["ours-compiled"]["tokens_per_s"] / results["ours"]["tokens_per_s"]

    if args.ddp_compare:
        if device.type != "cpu":
            print("--ddp-compare measures gloo on CPU; skipped on", device)
        elif batch_size % 2:
            print("--ddp-compare needs an even batch size; skipped")
        else:
            print("DDP comparison (ours, CPU): 2 gloo processes with 1 thread each vs this process with "
                  f"{torch.get_num_threads()} threads, same global batch {batch_size} ...", flush=True)
            ddp = ddp_compare(args.preset, batch_size, steps, warmup, results["ours"]["step_ms"] / 1000)
            report["ddp"] = ddp
            print(f"  1 process x {ddp['single_process_threads']} threads: {ddp['single_step_ms']:.0f} ms/step | "
                  f"2 processes x 1 thread: {ddp['ddp_step_ms']:.0f} ms/step | DDP speedup {ddp['speedup']:.2f}x")
            cores = os.cpu_count() or 1
            if ddp["single_process_threads"] >= 2 and cores <= 2:
                print(f"  On this {cores}-core machine both set-ups use the same 2 cores: DDP only swaps intra-op "
                      "threading for data parallelism and adds a gradient all-reduce, so ~1x (not >=1.6x) is "
                      "what to expect; the figure above is what came out.")
            else:
                print(f"  The single process ran {ddp['single_process_threads']} thread(s) on {cores} cores; the 2 "
                      "ranks use 2 cores in all, so this ratio mixes DDP's scaling with the extra core.")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.preset}-{device.type}{'-compile' if args.compile else ''}.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {path}")
    print("ours: our default (KL and MLM head at the masked positions); ours-allpos: the same math as naive "
          "(KL and head at every position); naive: the DistilBERT-style step"
          + ("; ours-allpos-unfused: ours-allpos with full logits and the plain losses (no kd/fused_head.py)"
             if args.unfused else "")
          + ("; ours-compiled: ours with torch.compile on the student (train.compile=true)" if args.compile else ""))
    if "fused_ratio" in report:
        print(f"fused/unfused ours-allpos tokens/s ratio: {report['fused_ratio']:.2f}")
    if "compile_ratio" in report:
        print(f"compiled/eager ours tokens/s ratio: {report['compile_ratio']:.2f}")
    elif args.compile:
        print(f"compiled/eager ours tokens/s ratio: not measured ({results['ours-compiled']['error']})")
    print(f"equal-math ours/naive tokens/s ratio: {report['equal_math_ratio']:.2f}")
    print(f"ours/naive tokens/s ratio: {report['ratio']:.2f}")
    return report


if __name__ == "__main__":
    main()
