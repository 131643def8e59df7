"""Validation loss per data source (`val/loss/<source>`), from per-token losses.

The decoder returns per-token losses given labels (`DecoderOutput.token_loss_BT`, 0 where the
label is ignored) and validation batches say which source each token came from
(`Batch.source_ids`, `Batch.sources`). Each source's loss is token-weighted over every batch, so
it equals the mean loss of that source's tokens however the batches split them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmfm.model import IGNORE_INDEX


class SourceLosses:
    """Accumulates loss sums and target counts per source name over evaluation batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @torch.no_grad()
    def add(self, token_loss_BT: Tensor, labels_BT: Tensor, source_ids_BT: Tensor | None,
            sources: Sequence[str]) -> None:
        """Add one batch; a batch without source ids (older loaders) adds nothing."""
        if source_ids_BT is None or not sources:
            return
        target_BT = (labels_BT != IGNORE_INDEX) & (source_ids_BT >= 0)
        loss_N = token_loss_BT.detach().float()[target_BT]
        source_N = source_ids_BT[target_BT].long()
        sums_S = torch.zeros(len(sources), dtype=torch.float64).index_add_(
            0, source_N.cpu(), loss_N.double().cpu())
        counts_S = torch.bincount(source_N.cpu(), minlength=len(sources))
        for name, total, count in zip(sources, sums_S.tolist(), counts_S.tolist(), strict=True):
            if count:
                self.sums[name] = self.sums.get(name, 0.0) + total
                self.counts[name] = self.counts.get(name, 0) + int(count)

    def add_batch(self, batch: Any, token_loss_BT: Tensor | None) -> None:
        """Add a validation batch with its per-token losses (`LossOutput.token_loss_BT`);
        batches without sources (training) or losses add nothing. Text batches name the
        sources of their shard index, multimodal ones their shard sets."""
        if token_loss_BT is not None:
            self.add(token_loss_BT, batch.labels, getattr(batch, "source_ids", None),
                     getattr(batch, "sources", ()))

    def metrics(self, prefix: str = "val/loss") -> dict[str, float]:
        """`{prefix}/<source>`: the token-weighted mean loss of each source seen."""
        return {f"{prefix}/{name}": self.sums[name] / self.counts[name]
                for name in sorted(self.sums)}
