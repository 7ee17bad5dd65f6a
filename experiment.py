"""The offline study: does distillation help? (configs/experiment.yaml; README "Results")

    make experiment                                   # about an hour on 2 CPU cores; rerun to resume
    nohup make experiment > logs/experiment.out 2>&1 &
    python experiment.py --config configs/experiment.yaml run_levers=true   # also the lever runs
    python experiment.py ... --no-latency             # skip timing the models on CPU

It runs the teacher warm-up, the students and the fine-tunes as ordinary torchrun runs, then
writes plots/<name>/ (figures, tables) and logs/<name>/summary.json (every number of the README
table) and logs/<name>/results.md (that table).
"""
import sys

from kd.errors import friendly_errors


def main(argv=None) -> None:
    with friendly_errors():
        args = list(sys.argv[1:] if argv is None else argv)
        config = "configs/experiment.yaml"
        latency = "--no-latency" not in args  # CPU timing of the exports (skip it in quick checks)
        args = [a for a in args if a != "--no-latency"]
        if args[:1] == ["--config"]:
            if len(args) < 2:
                raise SystemExit("--config needs a path, e.g. --config configs/experiment.yaml")
            config, args = args[1], args[2:]
        from kd import experiment
        cfg = experiment.load_experiment(config, args)
        stages = experiment.plan(cfg)
        minutes = experiment.run_stages(cfg, stages)
        from kd import study_report  # matplotlib and pandas only once the runs are done
        for path in study_report.write_all(cfg, stages, minutes, latency=latency):
            print(f"  {path}")


if __name__ == "__main__":
    main()
