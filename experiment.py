"""The offline study: does distillation help? (configs/experiment.yaml; README "Results")

    make experiment                                   # about an hour on 2 CPU cores; rerun to resume
    nohup make experiment > logs/experiment.out 2>&1 &
    make experiment-levers                            # the study plus the lever runs (run_levers=true)
    python experiment.py [--config PATH] [--no-latency] [key=value ...]
    python experiment.py --publish                    # the run's tables into README.md, summary + figures into docs/

It runs the teacher warm-up, the students and the fine-tunes as ordinary torchrun runs, then writes
plots/<name>/ (figures, tables), logs/<name>/summary.json (every number of the README tables) and
logs/<name>/results.md (those tables, rendered from summary.json).
"""
import argparse
import sys
from pathlib import Path

from kd.errors import friendly_errors


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/experiment.yaml", help="the study (default: %(default)s)")
    p.add_argument("--no-latency", action="store_true", help="skip timing the exported models on CPU")
    p.add_argument("--publish", action="store_true",
                   help="copy the finished run's summary and figures to docs/<name>/ and its tables into README.md")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run_levers=true nproc=1")
    return p.parse_args(argv)


def main(argv=None) -> None:
    with friendly_errors():
        args = parse_args(sys.argv[1:] if argv is None else argv)
        from kd import experiment
        cfg = experiment.load_experiment(args.config, args.overrides)
        if args.publish:
            from kd import study_report
            written = study_report.publish(cfg, Path("README.md"), Path("docs") / cfg.name)
        else:
            stages = experiment.plan(cfg)
            minutes = experiment.run_stages(cfg, stages)
            from kd import study_report  # matplotlib and pandas only once the runs are done
            written = study_report.write_all(cfg, stages, minutes, latency=not args.no_latency)
        print("files written:")
        for path in written:
            print(f"  {path}")


if __name__ == "__main__":
    main()
