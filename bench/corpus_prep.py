"""Corpus preparation: time and peak memory of the block cache build, the new path against the old.

    .venv/bin/python bench/corpus_prep.py                          # 50 / 250 / 1000 MB, num_proc 1 and 2
    .venv/bin/python bench/corpus_prep.py --sizes 20,80 --old-sizes 20   # a quick look

Text of each size is generated from the packaged Wikipedia sample (its articles repeated in a
shuffled order, one document per article, blank lines between). Every build runs in a fresh process:
the new path is the real command, `ddp_main.py --config configs/demo_teacher.yaml --prepare-only`
(MiniLM tokenizer, seq_len 128); the old path is the first reader (kd/data/legacy.py: documents in a
Python list, one process, int64 ids), saved the way it was. A sampler thread reads the memory of
the whole process tree (the build and every worker) from /proc every 0.2 s:
- RSS: the sum of VmRSS, what `ps` shows; pages shared by processes count once per process;
- PSS: the sum of each process's proportional share (/proc/PID/smaps_rollup), shared pages counted once;
- anon: the RSS part that is not file-backed (RssAnon): the memory the kernel cannot drop.
The slope is the growth of peak RSS per GB of text between the smallest and the largest size.
CPU time is the whole tree's (user + system); "cores busy" is CPU time over wall time: on a machine
shared with other jobs, wall time only falls with num_proc as far as there are idle cores.
"""
import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.soak_driver import child_pids  # noqa: E402  (/proc children, shared with the soak)

MB = 2 ** 20


def make_text(path: str, megabytes: int) -> None:
    """`megabytes` of text: the sample's articles, reshuffled each round, blank lines between them."""
    from kd.data.corpus import wiki_sample_articles
    articles = wiki_sample_articles()
    rng = random.Random(0)
    written, target = 0, megabytes * MB
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            rng.shuffle(articles)
            for article in articles:
                text = article + "\n\n"
                fh.write(text)
                written += len(text.encode("utf-8"))
                if written >= target:
                    break


def _tree(pid: int) -> list:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(child_pids(p))
    return pids


def _kb(path: str, keys: tuple) -> dict:
    values = {}
    try:
        with open(path) as fh:
            for line in fh:
                name = line.split(":", 1)[0]
                if name in keys:
                    values[name] = int(line.split()[1])
    except OSError:
        pass
    return values


class TreeMemory(threading.Thread):
    """Peak RSS, PSS and anonymous RSS (MB) of a process and its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()
        self.peak = {"rss": 0.0, "pss": 0.0, "anon": 0.0, "processes": 0}

    def run(self) -> None:
        while not self.done.is_set():
            rss = pss = anon = 0
            pids = _tree(self.pid)
            for p in pids:
                status = _kb(f"/proc/{p}/status", ("VmRSS", "RssAnon"))
                rss += status.get("VmRSS", 0)
                anon += status.get("RssAnon", 0)
                pss += _kb(f"/proc/{p}/smaps_rollup", ("Pss",)).get("Pss", 0)
            for key, value in (("rss", rss / 1024), ("pss", pss / 1024), ("anon", anon / 1024),
                               ("processes", len(pids))):
                self.peak[key] = max(self.peak[key], value)
            self.done.wait(0.2)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant, workers included
    return usage.ru_utime + usage.ru_stime


def measure(command: list) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cpu_before, started = _children_cpu(), time.time()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeMemory(proc.pid)
    sampler.start()
    output, _ = proc.communicate()
    seconds, cpu = time.time() - started, _children_cpu() - cpu_before
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return {"seconds": seconds, "cpu": cpu, **sampler.peak}


def run_new(text: str, num_proc: int, cache: str) -> dict:
    result = measure([sys.executable, "ddp_main.py", "--config", "configs/demo_teacher.yaml", "--prepare-only",
                      "data.source=text", f"data.train_files=[{text}]", f"data.cache_dir={cache}",
                      f"data.num_proc={num_proc}"])
    [info_path] = [os.path.join(cache, d, "info.json") for d in os.listdir(cache) if d.startswith("blocks-")
                   and not d.endswith((".lock", ".work", ".tmp"))]
    with open(info_path) as fh:
        info = json.load(fh)
    result["tokens"] = sum(info["blocks"].values()) * info["seq_len"]  # tokens in blocks, as for the old path
    return result


def run_old(text: str, cache: str) -> dict:
    out = os.path.join(cache, "result.json")
    result = measure([sys.executable, os.path.abspath(__file__), "--legacy-build", text, cache])
    with open(out) as fh:
        result["tokens"] = json.load(fh)["tokens"]
    return result


def legacy_build(text: str, cache: str) -> None:
    """The first path end to end, as kd/data/blocks.py ran it: read, split, tokenise, save."""
    import numpy as np
    from kd.config import PretrainConfig, load_config
    from kd.data.legacy import read_text_file, split_documents, tokenize_to_blocks
    from kd.models import load_tokenizer
    cfg = load_config(PretrainConfig, "configs/demo_teacher.yaml", ["data.source=text", f"data.train_files=[{text}]"])
    tokenizer = load_tokenizer("packaged-minilm")
    train, val = split_documents(read_text_file(text), cfg.data.validation_fraction, 0)
    tokens = 0
    for name, docs in (("train", train), ("validation", val)):
        blocks = tokenize_to_blocks(docs, tokenizer, cfg.data.seq_len)
        np.save(os.path.join(cache, f"{name}.npy"), blocks)
        tokens += blocks.size
    with open(os.path.join(cache, "result.json"), "w") as fh:
        json.dump({"tokens": tokens}, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,250,1000", help="MB of text for the new path")
    parser.add_argument("--old-sizes", default="50,250", help="MB of text for the old path (6.4 bytes of RAM per byte)")
    parser.add_argument("--num-proc", default="1,2")
    parser.add_argument("--workdir", default="/tmp/kd-corpus-bench")
    parser.add_argument("--legacy-build", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.legacy_build:
        return legacy_build(*args.legacy_build)
    sizes = [int(s) for s in args.sizes.split(",")]
    old_sizes = [int(s) for s in args.old_sizes.split(",") if s]
    procs = [int(p) for p in args.num_proc.split(",")]
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    try:
        for size in sorted(set(sizes) | set(old_sizes)):
            text = os.path.join(args.workdir, f"text-{size}mb.txt")
            make_text(text, size)
            runs = [("new", p) for p in procs if size in sizes] + ([("old", 1)] if size in old_sizes else [])
            for path, num_proc in runs:
                cache = os.path.join(args.workdir, "cache")
                shutil.rmtree(cache, ignore_errors=True)
                os.makedirs(cache)
                result = run_new(text, num_proc, cache) if path == "new" else run_old(text, cache)
                shutil.rmtree(cache)
                rows.append({"path": path, "mb": size, "num_proc": num_proc, **result})
                print(f"  {path} {size} MB num_proc={num_proc}: {result['seconds']:.1f} s, "
                      f"peak RSS {result['rss']:.0f} MB", flush=True)
            os.remove(text)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    report(rows)


def report(rows: list) -> None:
    print("\n| path | text | num_proc | time | tokens/s | CPU time | tokens per CPU-s | cores busy | "
          "peak RSS (tree) | peak PSS (tree) | peak anon (tree) | processes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['mb']} MB | {r['num_proc']} | {r['seconds']:.1f} s | "
              f"{r['tokens'] / r['seconds'] / 1e6:.2f} M | {r['cpu']:.1f} s | {r['tokens'] / r['cpu'] / 1e6:.2f} M | "
              f"{r['cpu'] / r['seconds']:.2f} | {r['rss']:.0f} MB | {r['pss']:.0f} MB | {r['anon']:.0f} MB | "
              f"{r['processes']} |")
    print()
    groups = sorted({(r["path"], r["num_proc"]) for r in rows})
    for path, num_proc in groups:
        runs = sorted((r for r in rows if (r["path"], r["num_proc"]) == (path, num_proc)), key=lambda r: r["mb"])
        if len(runs) > 1:
            small, large = runs[0], runs[-1]
            slope = (large["rss"] - small["rss"]) / ((large["mb"] - small["mb"]) / 1024)
            print(f"{path}, num_proc={num_proc}: peak RSS grows {slope:.0f} MB per GB of text "
                  f"({small['mb']} -> {large['mb']} MB: {small['rss']:.0f} -> {large['rss']:.0f} MB, "
                  f"x{large['rss'] / small['rss']:.2f})")
    by_key = {(r["path"], r["mb"], r["num_proc"]): r for r in rows}
    for (path, mb, num_proc), r in sorted(by_key.items()):
        old = by_key.get(("old", mb, 1))
        if path == "new" and old:
            print(f"{mb} MB, new num_proc={num_proc} against old: {old['seconds'] / r['seconds']:.2f}x faster, "
                  f"{old['rss'] / r['rss']:.2f}x less peak RSS")
        single = by_key.get(("new", mb, 1))
        if path == "new" and num_proc > 1 and single:
            print(f"{mb} MB, new num_proc={num_proc} against num_proc=1: {single['seconds'] / r['seconds']:.2f}x faster")


if __name__ == "__main__":
    main()
