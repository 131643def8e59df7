"""Loss by position bucket: do late positions of a sequence improve (long-context training)?

A pure function from per-token losses to per-bucket means; the evaluation loop sums
`bucket_sums` over batches (and ranks: both are SUM-reduced) and divides at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmfm.errors import UserValueError


def position_buckets(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
    """[start, end) position ranges of `num_buckets` equal-width buckets over `seq_len`
    (the last one takes the remainder)."""
    if not 1 <= num_buckets <= seq_len:
        raise UserValueError(f"num_buckets={num_buckets} must be in [1, seq_len={seq_len}]")
    width = seq_len // num_buckets
    edges = [i * width for i in range(num_buckets)] + [seq_len]
    return list(zip(edges[:-1], edges[1:], strict=True))


def bucket_sums(token_loss_BT: Tensor, mask_BT: Tensor, num_buckets: int) -> tuple[Tensor, Tensor]:
    """(loss sum, target count) per bucket, each (num_buckets,) fp64; `mask_BT` marks the
    positions that have a target (labels != ignore)."""
    T = token_loss_BT.shape[1]
    bucket_T = torch.empty(T, dtype=torch.long, device=token_loss_BT.device)
    for b, (lo, hi) in enumerate(position_buckets(T, num_buckets)):
        bucket_T[lo:hi] = b
    mask = mask_BT.to(torch.float64)
    loss_T = (token_loss_BT.to(torch.float64) * mask).sum(0)
    count_T = mask.sum(0)
    sums = torch.zeros(num_buckets, dtype=torch.float64, device=loss_T.device)
    counts = torch.zeros_like(sums)
    return sums.index_add_(0, bucket_T, loss_T), counts.index_add_(0, bucket_T, count_T)


def bucket_metrics(sums: Tensor, counts: Tensor, seq_len: int,
                   prefix: str = "eval/loss_pos") -> dict[str, float]:
    """{"{prefix}_{start}-{end}": mean loss} from summed `bucket_sums` outputs (over batches
    and ranks); buckets with no target are left out."""
    ranges = position_buckets(seq_len, len(sums))
    return {f"{prefix}_{lo}-{hi}": float(s / c)
            for (lo, hi), s, c in zip(ranges, sums, counts, strict=True) if c > 0}


def loss_by_position(token_loss_BT: Tensor, mask_BT: Tensor,
                     num_buckets: int = 4) -> dict[str, float]:
    """Per-bucket mean losses of one batch (see `bucket_metrics` for the names)."""
    sums, counts = bucket_sums(token_loss_BT, mask_BT, num_buckets)
    return bucket_metrics(sums, counts, token_loss_BT.shape[1])
