"""Datasets, a resumable distributed sampler, and the MLM collate function."""
import itertools
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kd.data.masking import MaskingSpec, mask_batch


class IndexedBlocks(Dataset):
    """Token blocks that remember their index (the masking seed needs it)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int):
        return index, torch.from_numpy(np.asarray(self.blocks[index], dtype=np.int64))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch, so a resumed run sees the same batches."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_start(self, samples_to_skip: int) -> None:
        self.start = samples_to_skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class LengthGroupedSampler(ResumableSampler):
    """Shuffled, then sorted by length within windows of `window` global batches, so that a batch
    pads its rows to similar lengths (HF's group_by_length idea: ~1.6x fewer padded tokens on the
    tweets); the order of the batches is shuffled again so long and short ones alternate.
    Rank r takes its share of every global batch, so the ranks' batches stay alike in length."""

    def __init__(self, dataset, lengths: Sequence[int], batch_size: int, num_replicas: int, rank: int,
                 seed: int, window: int = 50):
        super().__init__(dataset, num_replicas, rank, seed, shuffle=True)
        self.lengths, self.batch_size, self.window = list(lengths), batch_size, window
        self.num_samples = len(self.lengths) // (batch_size * num_replicas) * batch_size  # whole batches only
        self.total_size = self.num_samples * num_replicas

    def global_order(self) -> list:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=gen)[:self.total_size].tolist()
        global_batch = self.batch_size * self.num_replicas
        span = global_batch * self.window
        order = [i for start in range(0, len(order), span)
                 for i in sorted(order[start:start + span], key=lambda i: -self.lengths[i])]
        batches = [order[start:start + global_batch] for start in range(0, len(order), global_batch)]
        return [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.global_order()[self.rank::self.num_replicas]), self.start, None)


class MLMCollate:
    """Stacks blocks and masks them; the epoch is set by the training loop."""

    def __init__(self, spec: MaskingSpec):
        self.spec = spec
        self.epoch = 0

    def __call__(self, items):
        indices = [i for i, _ in items]
        return mask_batch([b for _, b in items], indices, self.spec, self.epoch)


def make_loader(dataset, batch_size: int, collate, rank: int = 0, world_size: int = 1,
                seed: int = 0, shuffle: bool = True, num_workers: int = 0,
                pin_memory: bool = False, lengths: Optional[Sequence[int]] = None) -> DataLoader:
    """`lengths` (one per item) turns on length-grouped batches; otherwise a plain shuffle."""
    if lengths is not None:
        sampler = LengthGroupedSampler(dataset, lengths, batch_size, world_size, rank, seed)
    else:
        sampler = ResumableSampler(dataset, world_size, rank, seed, shuffle=shuffle)
    # A private generator: otherwise every new iterator draws its base seed from the global torch
    # RNG, and a resumed run's dropout would drift from the uninterrupted run's.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=True, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def eval_batches(dataset, batch_size: int, collate, rank: int, world_size: int,
                 max_batches: Optional[int]):
    """A fixed, unshuffled slice of the validation set, split across ranks."""
    loader = make_loader(dataset, batch_size, collate, rank, world_size, shuffle=False)
    return itertools.islice(loader, max_batches)
