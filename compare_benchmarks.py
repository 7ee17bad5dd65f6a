"""Convergence plots, fine-tuning curves and model benchmark tables from logs/ into plots/.

    python compare_benchmarks.py
    python compare_benchmarks.py --runs demo demo-nokd \
        --models checkpoints/demo-teacher/final checkpoints/demo/final
"""
import argparse
import logging
import sys

import matplotlib

matplotlib.use("Agg")  # files only, never a window: this runs under nohup and on servers

from kd import report  # noqa: E402
from kd.errors import KDError, friendly_errors  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs-dir", default="logs", help="where the runs' folders are (default: logs)")
    p.add_argument("--plots-dir", default="plots", help="where figures and tables go (default: plots)")
    p.add_argument("--runs", nargs="+", metavar="NAME",
                   help="runs to plot (default: every folder under --logs-dir with a metrics.jsonl)")
    p.add_argument("--models", nargs="+", metavar="PATH",
                   help="Hugging Face model folders to benchmark (default: the export_dir of each "
                        "pretraining run, plus local models named in results.json)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to time models")
    p.add_argument("--no-latency", action="store_true", help="skip latency/throughput timing")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds per model (median and IQR over rounds)")
    return p.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if args.repeats < 1:
        raise KDError(f"--repeats must be at least 1, got {args.repeats}")
    written = report.build_report(args.logs_dir, args.plots_dir, run_names=args.runs, models=args.models,
                                  device=args.device, latency=not args.no_latency, repeats=args.repeats)
    print("files written:" if written else "no files written")
    for path in written:
        print(f"  {path}")
    return written


if __name__ == "__main__":
    with friendly_errors():
        main()
