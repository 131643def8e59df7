"""Optional routing trace: one JSON line per MoE forward with the chosen experts and weights.

Feeds the routing-analysis reports. Attach a writer to layers with `MoELayer.attach_trace`;
set `writer.context` (e.g. {"step": 100, "source": "wiki", "modality": "text"}) before a
forward to tag its records. Each record:
`{"layer": i, "shape": [B, S], "experts": [[[e,...] x S] x B], "weights": [...], **context}`
so the token position of an entry is its (row, column) in the nested lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor


class RoutingTraceWriter:
    """Appends routing records to a JSONL file (close it, or use it as a context manager)."""

    def __init__(self, path: str | Path, decimals: int = 4) -> None:
        self.path = Path(path)
        self.decimals = decimals
        self.context: dict[str, Any] = {}
        self._file = self.path.open("a", encoding="utf-8")

    def record(self, layer: int | None, topk_idx_BSK: Tensor, weight_BSK: Tensor) -> None:
        """Write one forward's routing decisions for a (B, S, K) batch."""
        B, S, _ = topk_idx_BSK.shape
        weights = weight_BSK.detach().float().cpu().round(decimals=self.decimals).tolist()
        row = {"layer": layer, "shape": [B, S], "experts": topk_idx_BSK.cpu().tolist(),
               "weights": weights, **self.context}
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RoutingTraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    """All records of a trace file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
