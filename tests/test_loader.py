"""The length-grouped sampler: every rank's share of each global batch, similar lengths, exact resume."""
import random

from kd.data.loader import LengthGroupedSampler


def batches(sampler, batch_size):
    order = list(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def test_length_grouped_batches_split_every_global_batch_across_ranks_and_resume():
    rng = random.Random(0)
    lengths = [rng.randint(3, 64) for _ in range(1003)]
    ranks = [LengthGroupedSampler(range(1003), lengths, batch_size=4, num_replicas=2, rank=r, seed=7, window=10)
             for r in range(2)]
    per_rank = [batches(s, 4) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 1003 // 8  # whole global batches only
    seen = [i for b in per_rank[0] + per_rank[1] for i in b]
    assert len(seen) == len(set(seen)) == 1003 // 8 * 8       # disjoint, nothing repeated
    # a global batch is both ranks' batch at the same step: its rows come from one sorted window
    spreads = [max(lengths[i] for i in a + b) - min(lengths[i] for i in a + b) for a, b in zip(*per_rank)]
    assert sorted(spreads)[len(spreads) // 2] <= 8            # a random batch of 8 spans ~45 here
    # resume: skipping k samples gives the tail of the same order; a new epoch gives another order
    full = list(ranks[0])
    ranks[0].set_start(12)
    assert list(ranks[0]) == full[12:]
    ranks[0].set_start(0)
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != full
