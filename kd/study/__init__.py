"""The offline study (configs/experiment.yaml, README "Results"), as a resumable pipeline of ordinary runs.

spec.py     the study's config schema: runs, seeds, fine-tunes, pre-registered comparisons
plan.py     config -> ordered stages (torchrun ddp_main.py / finetuneit.py / cache_teacher.py commands)
runner.py   runs the stages, skips finished ones whose config is unchanged, records minutes
stats.py    the noise rule: pooled std and a paired test over seeds
summary.py  logs -> summary.json (every number the README reports)
render.py   summary.json -> the README's tables
figures.py  summary.json + logs -> the study's figures
compute.py  FLOPs and measured step times for the equal-compute curves
"""
