"""The offline study: where does distillation help, beyond noise? (configs/experiment.yaml; README "Results")

    make experiment                                   # the headline arms, about 85 minutes on 2 CPU cores
    nohup make experiment > logs/experiment.out 2>&1 &   # detached; rerun the same command to resume
    make experiment-levers                            # the study plus the lever arms (run_levers=true)
    python experiment.py [--config PATH] [--no-latency] [--no-timing] [key=value ...]
    python experiment.py --report-only                # summary and figures from the runs made so far
    python experiment.py --publish                    # the run's tables into README.md, summary + figures into docs/

It runs the teacher warm-up, the students (with seeds) and the fine-tunes as ordinary torchrun runs,
then writes plots/<name>/ (figures, tables), logs/<name>/summary.json (every number of the README
tables) and logs/<name>/results.md (those tables, rendered from summary.json).
"""
import argparse
import sys
from pathlib import Path

from kd.errors import friendly_errors


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/experiment.yaml", help="the study (default: %(default)s)")
    p.add_argument("--no-latency", action="store_true", help="skip timing the exported models on CPU")
    p.add_argument("--no-timing", action="store_true", help="skip the equal-compute step timing")
    p.add_argument("--report-only", action="store_true", help="run nothing; report what the logs hold")
    p.add_argument("--publish", action="store_true",
                   help="copy the finished run's summary and figures to docs/<name>/ and its tables into README.md")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run_levers=true nproc=1")
    return p.parse_args(argv)


def main(argv=None) -> None:
    with friendly_errors():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        from kd.study.plan import plan
        from kd.study.spec import load_experiment
        cfg = load_experiment(args.config, args.overrides)
        if args.publish:
            from kd.study.publish import publish
            written = publish(cfg, Path("README.md"), Path("docs") / cfg.name)
        else:
            from kd.study.runner import recorded_minutes, run_stages
            stages = plan(cfg)
            minutes = recorded_minutes(cfg) if args.report_only else run_stages(cfg, stages)
            from kd.study.publish import write_all  # matplotlib and pandas only once the runs are done
            written = write_all(cfg, stages, minutes, latency=not args.no_latency, timing=not args.no_timing,
                                config_path=args.config)
        print("files written:")
        for path in written:
            print(f"  {path}")


if __name__ == "__main__":
    main()
