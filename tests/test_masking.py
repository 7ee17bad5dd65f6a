import numpy as np
import pytest
import torch

from kd.data.masking import MaskingSpec, mask_batch, mask_block, num_predictions

CLS, SEP, MASK, PAD = 101, 102, 103, 0
SPEC = MaskingSpec(mask_token_id=MASK, vocab_size=30522, special_ids=(0, 100, 101, 102, 103), seed=7)


def block(seq_len=128, start=2000):
    ids = torch.arange(start, start + seq_len)
    ids[0], ids[-1] = CLS, SEP
    return ids


def test_fixed_number_of_predictions_and_specials_never_masked():
    for index in range(50):
        tokens = block()
        masked, positions, labels = mask_block(tokens, SPEC, epoch=0, block_index=index)
        assert positions.numel() == num_predictions(128, 0.15) == 19
        assert 0 not in positions and 127 not in positions
        assert masked[0] == CLS and masked[-1] == SEP
        assert torch.equal(labels, tokens[positions])
        untouched = torch.ones(128, dtype=torch.bool)
        untouched[positions] = False
        assert torch.equal(masked[untouched], tokens[untouched])


def test_80_10_10_statistics():
    n_mask = n_random = n_keep = 0
    for index in range(2000):
        tokens = block()
        masked, positions, labels = mask_block(tokens, SPEC, epoch=0, block_index=index)
        replaced = masked[positions]
        n_mask += int((replaced == MASK).sum())
        n_keep += int((replaced == labels).sum())
        n_random += int(((replaced != MASK) & (replaced != labels)).sum())
    total = n_mask + n_keep + n_random
    assert total == 2000 * 19
    assert abs(n_mask / total - 0.8) < 0.01
    assert abs(n_keep / total - 0.1) < 0.01   # includes the rare random draw of the same id
    assert abs(n_random / total - 0.1) < 0.01


def test_positions_are_uniform_over_the_block():
    counts = torch.zeros(128)
    for index in range(3000):
        _, positions, _ = mask_block(block(), SPEC, epoch=0, block_index=index)
        counts[positions] += 1
    rates = counts[1:-1] / 3000
    assert abs(rates.mean().item() - 19 / 126) < 1e-6
    assert rates.min() > 0.11 and rates.max() < 0.19


def test_dynamic_masks_change_per_epoch_static_masks_do_not():
    tokens = block()
    a = mask_block(tokens, SPEC, epoch=0, block_index=3)[1]
    b = mask_block(tokens, SPEC, epoch=1, block_index=3)[1]
    assert not torch.equal(a, b)
    static = MaskingSpec(**{**SPEC.__dict__, "static": True})
    c = mask_block(tokens, static, epoch=0, block_index=3)[1]
    d = mask_block(tokens, static, epoch=5, block_index=3)[1]
    assert torch.equal(c, d)
    assert torch.equal(mask_block(tokens, SPEC, 0, 3)[0], mask_block(tokens, SPEC, 0, 3)[0])  # reproducible


def test_mask_batch_shapes():
    batch = mask_batch([block(), block(start=5000)], [0, 1], SPEC, epoch=0)
    assert batch["input_ids"].shape == (2, 128)
    assert batch["masked_positions"].shape == batch["mlm_labels"].shape == (2, 19)


def test_rare_token_weighting_masks_rare_tokens_more_often():
    """DistilBERT's count^-0.7: a token 100x rarer is 100^0.7 ~ 25x likelier to be picked per occurrence."""
    from kd.data.masking import rare_token_weights
    common, rare = 2000, 3000
    blocks = np.full((200, 64), common, dtype=np.uint16)
    blocks[:, 0], blocks[:, -1] = 101, 102
    blocks[::100, 10] = rare                      # 2 occurrences of `rare` against ~12,400 of `common`
    weights = rare_token_weights(blocks, 30522, 0.7)
    assert weights[rare] / weights[common] == pytest.approx((12398 / 2) ** 0.7, rel=1e-3)
    uniform = MaskingSpec(mask_token_id=103, vocab_size=30522, special_ids=(0, 100, 101, 102, 103), seed=3)
    weighted = MaskingSpec(103, 30522, (0, 100, 101, 102, 103), seed=3, token_weights=weights)
    block = torch.from_numpy(blocks[0].astype(np.int64))
    hits = {"uniform": 0, "weighted": 0}
    for epoch in range(200):
        for name, spec in (("uniform", uniform), ("weighted", weighted)):
            _, positions, labels = mask_block(block, spec, epoch, 0)
            assert len(positions) == num_predictions(64, 0.15) and len(set(positions.tolist())) == len(positions)
            hits[name] += int((labels == rare).sum())
    assert hits["weighted"] == 200                # dominated by its weight: picked in every draw
    assert hits["uniform"] < 60                   # ~9 of 62 candidates: ~15% of draws
