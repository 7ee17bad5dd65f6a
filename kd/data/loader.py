"""Datasets, a resumable distributed sampler, and the MLM collate function."""
import itertools
from typing import Iterator, Optional

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
                pin_memory: bool = False) -> DataLoader:
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
