"""`make gpu-check`: what the CUDA path does, in one prepared run of about 8 minutes at most.

On a CUDA machine it
1. runs bench/distill_throughput.py --preset bert-large --device cuda --compile (bf16): the default
   step eager and under torch.compile, interleaved, and prints tokens/s and MFU against the device's
   dense bf16 peak (datasheet) as well as against the matmul peak the bench measures;
2. checks which SDPA kernels serve the teacher and the student: each forward is run with only
   flash attention, then only memory-efficient attention, allowed (a kernel that cannot serve the
   call raises, so a forward that passes was served by it);
3. runs the demo distillation under a 1-GPU `torchrun` (nccl, bf16 autocast): a short MLM warm-up
   of the packaged MiniLM as the teacher, an uninterrupted student run, and the same run killed
   with SIGKILL after its first checkpoint and resumed; it checks that every logged loss is
   finite, that the resumed run finishes, and how far its final loss and weights are from the
   uninterrupted run's (CUDA kernels are not bitwise deterministic, so this is reported, and
   checked against a loose tolerance);
4. writes every figure to logs/gpu-check/gpu_check.json.

Without CUDA it prints this plan and exits 0.

    .venv/bin/python bench/gpu_check.py [--out logs/gpu-check] [--skip-bench]
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Dense bf16 tensor-core peaks from the datasheets (SXM parts), by a name fragment of the device.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
STUDENT_STEPS, KILL_AFTER_STEP = 40, 20


def datasheet_peak(name: str):
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def run(args, timeout, out_file=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.time()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if out_file is not None:
        Path(out_file).write_text(result.stdout + result.stderr)
    return result, time.time() - started


def bench(out: Path, peak_tflops) -> dict:
    """One bench run with --compile: the eager and the compiled default step, interleaved."""
    folder = out / "bench"
    args = [PY, "bench/distill_throughput.py", "--preset", "bert-large", "--device", "cuda", "--compile",
            "--out", str(folder)]
    result, seconds = run(args, timeout=360, out_file=folder.with_suffix(".out"))
    if result.returncode != 0:
        failed = {"ok": False, "error": (result.stderr or result.stdout)[-1500:], "seconds": seconds}
        return {"bench_eager": failed, "bench_compile": failed}
    report = json.loads(next(folder.glob("bert-large-cuda*.json")).read_text())
    useful = report["useful_gflop_per_step"] * 1e9
    entries = {}
    for key, variant in (("bench_eager", "ours"), ("bench_compile", "ours-compiled")):
        ours = report["variants"].get(variant, {})
        if "tokens_per_s" not in ours:
            entries[key] = {"ok": False, "error": ours.get("error", "not timed"), "seconds": seconds}
            continue
        entry = {"ok": True, "seconds": round(seconds, 1), "tokens_per_s": ours["tokens_per_s"],
                 "step_ms": ours["step_ms"], "batch_size": report["batch_size"],
                 "ours_naive_ratio": ours["tokens_per_s"] / report["variants"]["naive"]["tokens_per_s"],
                 "equal_math_ratio": report["equal_math_ratio"],
                 "mfu_vs_measured_matmul_peak": ours["mfu"], "measured_matmul_peak_tflops": report["matmul_peak_tflops"],
                 "peak_mem_mb": ours["peak_mem_mb"]}
        if peak_tflops:
            entry["mfu_vs_datasheet_bf16_peak"] = useful / (ours["step_ms"] / 1000) / (peak_tflops * 1e12)
        entries[key] = entry
    return entries


def sdpa_kernels() -> dict:
    """Which fused SDPA kernels can serve the teacher and the student forwards of the default recipe."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import BertConfig, BertForMaskedLM

    from kd.config import StudentConfig
    from kd.models import build_student

    config = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096)
    config._attn_implementation = "sdpa"
    teacher = BertForMaskedLM(config)
    student = build_student(StudentConfig(num_layers=6), teacher, 30522).cuda().train()
    teacher = teacher.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1000, 30522, (8, 128), device="cuda")
    mask = torch.ones_like(ids)
    out = {}
    for name, model in (("teacher", teacher), ("student", student)):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            key = f"{name}_{backend.name.lower()}"
            try:
                with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                    model.bert(input_ids=ids, attention_mask=mask)
                out[key] = True
            except RuntimeError as err:  # "No available kernel": this backend cannot serve the call
                out[key] = f"no: {str(err).splitlines()[0][:200]}"
    out["ok"] = all(out[f"{m}_flash_attention"] is True or out[f"{m}_efficient_attention"] is True
                    for m in ("teacher", "student"))
    return out


def torchrun(config: str, run_name: str, out: Path, extra) -> list:
    return [str(Path(PY).with_name("torchrun")), "--standalone", "--nproc_per_node=1", "ddp_main.py",
            "--config", config, f"run_name={run_name}", f"log_dir={out / 'logs'}",
            f"checkpoint_dir={out / 'checkpoints'}", "train.amp=bf16", "train.device=cuda", *extra]


def losses(log_dir: Path) -> list:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def demo_kill_resume(out: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    teacher = torchrun("configs/demo_teacher.yaml", "gpu-teacher", out,
                       ["train.max_steps=60", "train.eval_every=30", "train.save_every=60"])
    result, seconds = run(teacher, timeout=240, out_file=out / "teacher.out")
    if result.returncode != 0:
        return {"ok": False, "stage": "teacher warm-up", "error": result.stderr[-1500:]}
    student = ["teacher.name=" + str(out / "checkpoints" / "gpu-teacher" / "final"),
               f"train.max_steps={STUDENT_STEPS}", "train.save_every=10", "train.eval_every=20", "train.log_every=1"]
    whole, whole_s = run(torchrun("configs/demo.yaml", "gpu-whole", out, student), 240, out / "whole.out")
    if whole.returncode != 0:
        return {"ok": False, "stage": "uninterrupted student", "error": whole.stderr[-1500:]}
    # the same run, SIGKILLed once its checkpoint at KILL_AFTER_STEP exists, then started again
    killed = subprocess.Popen(torchrun("configs/demo.yaml", "gpu-killed", out, student), cwd=ROOT,
                              stdout=open(out / "killed.out", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = out / "checkpoints" / "gpu-killed" / f"step_{KILL_AFTER_STEP:06d}"
    deadline = time.time() + 180
    while not checkpoint.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if killed.poll() is None:
        os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed, resumed_s = run(torchrun("configs/demo.yaml", "gpu-killed", out, student), 240, out / "resumed.out")
    if resumed.returncode != 0:
        return {"ok": False, "stage": "resume after SIGKILL", "error": resumed.stderr[-1500:]}
    curve_whole, curve_resumed = losses(out / "logs" / "gpu-whole"), losses(out / "logs" / "gpu-killed")
    finite = all(math.isfinite(v) for _, v in curve_whole + curve_resumed)
    last_whole, last_resumed = dict(curve_whole)[STUDENT_STEPS], dict(curve_resumed)[STUDENT_STEPS]
    weights_whole = load_file(out / "checkpoints" / "gpu-whole" / "final" / "model.safetensors")
    weights_resumed = load_file(out / "checkpoints" / "gpu-killed" / "final" / "model.safetensors")
    max_diff = max(float((weights_whole[k].float() - weights_resumed[k].float()).abs().max()) for k in weights_whole)
    relative = abs(last_whole - last_resumed) / abs(last_whole)
    return {"ok": finite and relative < 0.02, "losses_finite": finite, "killed_at_checkpoint": checkpoint.is_dir(),
            "final_loss_uninterrupted": last_whole, "final_loss_resumed": last_resumed,
            "final_loss_relative_diff": relative, "max_abs_weight_diff": max_diff,
            "bitwise_equal_weights": max_diff == 0.0, "student_run_seconds": round(whole_s, 1),
            "resume_run_seconds": round(resumed_s, 1), "cuda_device": torch.cuda.get_device_name()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="logs/gpu-check", help="folder for gpu_check.json and the runs")
    parser.add_argument("--skip-bench", action="store_true", help="only the SDPA and torchrun checks")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here, so nothing was run. On a CUDA machine it runs:")
        print(__doc__.split("On a CUDA machine it\n", 1)[1].split("\nWithout CUDA", 1)[0])
        return 0
    sys.path.insert(0, str(ROOT))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    peak = datasheet_peak(name)
    report = {"device": name, "datasheet_bf16_peak_tflops": peak, "torch": torch.__version__}
    print(f"gpu-check on {name} (datasheet dense bf16 peak: {peak or 'unknown'} TFLOP/s)", flush=True)
    if not args.skip_bench:
        report.update(bench(out, peak))
        for key in ("bench_eager", "bench_compile"):
            r = report[key]
            if r["ok"]:
                mfu = r.get("mfu_vs_datasheet_bf16_peak")
                print(f"{key}: {r['tokens_per_s']:.0f} tokens/s, batch {r['batch_size']}, MFU "
                      f"{'%.1f%%' % (100 * mfu) if mfu else '?'} of the datasheet peak, "
                      f"{100 * r['mfu_vs_measured_matmul_peak']:.1f}% of the measured matmul peak", flush=True)
            else:
                print(f"{key}: failed: {r['error'][-300:]}", flush=True)
    report["sdpa"] = sdpa_kernels()
    print(f"sdpa: {report['sdpa']}", flush=True)
    report["demo_kill_resume"] = demo_kill_resume(out)
    print(f"demo kill/resume: {report['demo_kill_resume']}", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    ok = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    print(f"wrote {out / 'gpu_check.json'}; gpu-check: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
