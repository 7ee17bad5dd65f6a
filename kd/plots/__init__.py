"""Figures for the report, one module per family; nothing is re-exported, so each name has one home.

- style.py        the shared look: figure/save, axis styling, run colours, display names, numbers
- convergence.py  pretraining curves: total loss, each loss term, validation metrics, learning rate
- finetune_curves.py  fine-tuning loss and task metric per epoch, one figure per task
- benchmarks.py   model comparison (size, latency, throughput, accuracy) and the training bench

Every figure is a `matplotlib.figure.Figure` with an Agg canvas, so nothing here touches pyplot's
global state or needs a display. Data comes in already loaded (see kd/report/); runs are any
objects with `name`, `kind`, `task`, `has(key)`, `has_eval`, `loss_terms` and `series(key, x)`.
"""
