"""Loss by position bucket on planted per-token losses where the answer is known."""

from __future__ import annotations

import pytest
import torch

from mmfm.errors import UserValueError
from mmfm.metrics.position import (
    bucket_metrics,
    bucket_sums,
    loss_by_position,
    position_buckets,
)


def test_buckets_cover_every_position_once():
    assert position_buckets(10, 3) == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(UserValueError, match="num_buckets=11"):
        position_buckets(10, 11)


def test_planted_losses_give_known_bucket_means():
    # loss = position index, so bucket [lo, hi) has mean (lo + hi - 1) / 2
    loss_BT = torch.arange(8.0).repeat(3, 1)
    mask_BT = torch.ones(3, 8, dtype=torch.bool)
    out = loss_by_position(loss_BT, mask_BT, num_buckets=4)
    assert out == {"eval/loss_pos_0-2": 0.5, "eval/loss_pos_2-4": 2.5,
                   "eval/loss_pos_4-6": 4.5, "eval/loss_pos_6-8": 6.5}


def test_ignored_targets_do_not_count_and_empty_buckets_are_left_out():
    loss_BT = torch.tensor([[1.0, 3.0, 100.0, 100.0], [5.0, 7.0, 100.0, 100.0]])
    mask_BT = torch.tensor([[True, True, False, False], [True, False, False, False]])
    assert loss_by_position(loss_BT, mask_BT, num_buckets=2) == {"eval/loss_pos_0-2": 3.0}


def test_sums_over_batches_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    loss_BT, mask_BT = torch.rand(6, 12, generator=g), torch.rand(6, 12, generator=g) > 0.3
    s1, c1 = bucket_sums(loss_BT[:2], mask_BT[:2], 3)
    s2, c2 = bucket_sums(loss_BT[2:], mask_BT[2:], 3)
    s, c = bucket_sums(loss_BT, mask_BT, 3)
    torch.testing.assert_close(s1 + s2, s)
    torch.testing.assert_close(c1 + c2, c)
    assert bucket_metrics(s1 + s2, c1 + c2, 12) == loss_by_position(loss_BT, mask_BT, 3)
