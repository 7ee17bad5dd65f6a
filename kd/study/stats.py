"""The noise rule (configs/experiment.yaml `noise_rule`), as pure functions of per-seed values.

A difference between arms a and b counts as a win only when it exceeds `std_multiple` x their pooled
std, or when a paired t-test over the seeds both arms share gives p < `paired_alpha` (two-sided).
Twins share a seed: the same data order, dropout seed and fine-tuning seed, so pairing removes the
part of the spread that both arms have in common.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, Optional

from scipy import stats as scipy_stats


def spread(per_seed: Dict) -> dict:
    values = list(per_seed.values())
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values),
            "per_seed": dict(per_seed)}


def pooled_std(a: list, b: list) -> Optional[float]:
    """sqrt of the mean of the two sample variances (each arm needs 2+ values)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)


def paired_p(a: Dict, b: Dict) -> Optional[float]:
    """Two-sided paired t-test over the seeds both have; None with fewer than 2 pairs or when every
    pair differs by the same amount (the test is undefined)."""
    seeds = sorted(set(a) & set(b), key=str)
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    if statistics.pvariance(diffs) == 0:
        return None
    return float(scipy_stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def judge(a: Dict, b: Dict, lower_is_better: bool, std_multiple: float, paired_alpha: float) -> dict:
    """Compare per-seed values of arm a against arm b. `gain` > 0 means a is better."""
    mean_a, mean_b = statistics.fmean(a.values()), statistics.fmean(b.values())
    gain = (mean_b - mean_a) if lower_is_better else (mean_a - mean_b)
    pooled = pooled_std(list(a.values()), list(b.values()))
    threshold = std_multiple * pooled if pooled is not None else None
    p = paired_p(a, b)
    beyond_std = threshold is not None and abs(gain) > threshold
    paired = p is not None and p < paired_alpha
    if gain != 0 and (beyond_std or paired):
        verdict = "a wins" if gain > 0 else "b wins"
    else:
        verdict = "within noise"
    return {"mean_a": mean_a, "mean_b": mean_b, "gain": gain, "pooled_std": pooled, "threshold": threshold,
            "paired_p": p, "n_a": len(a), "n_b": len(b), "beyond_std_rule": beyond_std, "paired_test": paired,
            "verdict": verdict}
