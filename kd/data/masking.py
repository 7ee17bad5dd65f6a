"""BERT masked-LM masking with a fixed number of predicted positions per block.

15% of the maskable (non-special) positions are chosen; of those, 80% become [MASK], 10% a
random token and 10% stay unchanged. Because blocks are full, every block gets exactly
`k = round(p * (seq_len - 2))` predictions, so tensors have static shapes and the training step
never needs `nonzero()` or a host sync to find the masked positions.

Each block's mask is drawn from its own generator seeded by (seed, epoch, block index). That makes
masks reproducible without saving RNG state (exact resume) and lets the same mask be drawn again
elsewhere (a teacher cache). Static masks use epoch 0 in every epoch.
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class MaskingSpec:
    mask_token_id: int
    vocab_size: int
    special_ids: tuple
    probability: float = 0.15
    seed: int = 0
    static: bool = False
    # Per-token-id weights for choosing positions (DistilBERT's rare-token masking); None: uniform.
    token_weights: Optional[torch.Tensor] = field(default=None, compare=False)


def num_predictions(seq_len: int, probability: float) -> int:
    return max(1, round(probability * (seq_len - 2)))


def block_generator(seed: int, epoch: int, block_index: int) -> torch.Generator:
    mixed = np.random.SeedSequence([seed, epoch, block_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def mask_block(tokens: torch.Tensor, spec: MaskingSpec, epoch: int, block_index: int):
    """tokens (S,) -> (masked input (S,), masked positions (k,), original ids at them (k,))."""
    gen = block_generator(spec.seed, 0 if spec.static else epoch, block_index)
    special = torch.isin(tokens, torch.tensor(spec.special_ids, dtype=tokens.dtype))
    candidates = (~special).nonzero().squeeze(1)  # on CPU in the loader, not in the train step
    k = num_predictions(tokens.numel(), spec.probability)
    if candidates.numel() < k:
        raise ValueError(f"block {block_index} has {candidates.numel()} maskable tokens, need {k}")
    if spec.token_weights is None:
        picked = torch.randperm(candidates.numel(), generator=gen)[:k]
    else:  # k positions without replacement, each with probability ~ its token's weight
        picked = torch.multinomial(spec.token_weights[tokens[candidates].long()], k, replacement=False, generator=gen)
    positions = candidates[picked].sort().values
    labels = tokens[positions].clone()
    roll = torch.rand(k, generator=gen)
    random_ids = torch.randint(0, spec.vocab_size, (k,), generator=gen, dtype=tokens.dtype)
    replacement = torch.where(roll < 0.8, torch.full_like(labels, spec.mask_token_id),
                              torch.where(roll < 0.9, random_ids, labels))
    masked = tokens.clone()
    masked[positions] = replacement
    return masked, positions, labels


def mask_batch(blocks: Sequence[torch.Tensor], block_indices: Sequence[int], spec: MaskingSpec,
               epoch: int) -> dict:
    parts = [mask_block(b, spec, epoch, int(i)) for b, i in zip(blocks, block_indices)]
    return {
        "input_ids": torch.stack([p[0] for p in parts]),
        "masked_positions": torch.stack([p[1] for p in parts]),
        "mlm_labels": torch.stack([p[2] for p in parts]),
        "block_indices": torch.as_tensor(list(block_indices), dtype=torch.long),
    }


def rare_token_weights(blocks: np.ndarray, vocab_size: int, smoothing: float) -> torch.Tensor:
    """DistilBERT's mlm_smoothing: weight max(count, 1)^-smoothing per token id, counts over `blocks`,
    so rare tokens are masked more often than their frequency alone would give."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(blocks), 4096):  # in slices: the blocks may be a memory-mapped corpus
        counts += np.bincount(np.asarray(blocks[start:start + 4096]).ravel(), minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(np.maximum(counts, 1).astype(np.float64) ** -smoothing).float()


def masking_spec_for(tokenizer, data_cfg, static: bool = None, token_weights=None) -> MaskingSpec:
    """`token_weights` (rare_token_weights) for training masks with data.mask_weighting=rare; held-out
    masks stay uniform, so runs with either weighting are scored on the same masks."""
    return MaskingSpec(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                       special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
                       probability=data_cfg.mlm_probability, seed=data_cfg.mask_seed,
                       static=data_cfg.static_masks if static is None else static, token_weights=token_weights)
