"""Routing records: one compact, columnar `.npz` file per capture (a checkpoint or a training step).

Shape legend: N tokens, L MoE layers, K experts per token.

Columns (see docs/analysis.md for the full schema):

    experts_LNK   uint8/uint16  top-k expert ids, in router order (first choice first)
    weights_LNK   float16       gate weights of those experts
    token_N       int32         input token id
    next_N        int32         the next token (the label), -1 where there is none
    predicted_N   int32         the model's argmax prediction for the next token, -1 unknown
    source_N      int16         index into meta["sources"], -1 for padding
    modality_N    int8          0 text, 1 image, 2 audio (placeholder tokens)
    row_N         int32         which held-out sequence the token sits in (consecutive-token and
                                token-view analyses only pair neighbours of the same row)
    layers_L      int32         decoder layer index of each MoE layer
    meta          JSON string   format, version, step, num_experts, top_k, sources, modalities,
                                expert_groups (modality expert groups only)

With modality expert groups (MoMa) expert ids are global: the groups laid end to end in the
order text, image, audio; `expert_groups` maps each group to [first id, number of experts]
(`RoutingRecords.group_slices`). Without it all experts form one shared pool.

Plain `np.savez` (no compression): 1M tokens x 4 layers x top-2 is ~45 MB and writes in about
a second (bench/routing_records.py). Any numpy reads it back; nothing here pickles.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmfm.errors import UserValueError

FORMAT = "mmfm-routing-records"
VERSION = 1
MODALITIES = ("text", "image", "audio")
_COLUMNS = ("experts_LNK", "weights_LNK", "token_N", "next_N", "predicted_N", "source_N",
            "modality_N", "row_N", "layers_L")


class RoutingRecordsError(UserValueError):
    """A routing-records file that cannot be read; the message names the file."""


@dataclass
class RoutingRecords:
    """Routing of N held-out tokens through L MoE layers at one training step."""

    step: int
    num_experts: int
    top_k: int
    layers_L: np.ndarray
    experts_LNK: np.ndarray
    weights_LNK: np.ndarray
    token_N: np.ndarray
    next_N: np.ndarray
    predicted_N: np.ndarray
    source_N: np.ndarray
    modality_N: np.ndarray
    row_N: np.ndarray
    sources: list[str] = field(default_factory=lambda: ["unknown"])
    # Modality expert groups: name -> (first global expert id, count); None for shared routing.
    expert_groups: dict[str, tuple[int, int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form meta (run, checkpoint path)

    @property
    def num_tokens(self) -> int:
        return int(self.token_N.shape[0])

    def group_slices(self) -> list[tuple[str, int, int]]:
        """(name, first global expert id, count) per expert group; one group "all" of every
        expert for shared routing."""
        if not self.expert_groups:
            return [("all", 0, self.num_experts)]
        return [(name, int(a), int(n)) for name, (a, n) in self.expert_groups.items()]

    def meta(self) -> dict[str, Any]:
        groups = ({} if not self.expert_groups else
                  {"expert_groups": {k: [int(a), int(n)] for k, (a, n) in self.expert_groups.items()}})
        return {"format": FORMAT, "version": VERSION, "step": self.step,
                "num_experts": self.num_experts, "top_k": self.top_k, "sources": self.sources,
                "modalities": list(MODALITIES), **groups, **self.extra}

    def validate(self, where: str = "routing records") -> None:
        """Internal consistency of the columns; raises `RoutingRecordsError` naming `where`."""
        L, N, K = self.experts_LNK.shape
        problems = []
        if self.weights_LNK.shape != (L, N, K):
            problems.append(f"weights {self.weights_LNK.shape} != experts {(L, N, K)}")
        if K != self.top_k or len(self.layers_L) != L:
            problems.append(f"top_k={self.top_k}, {len(self.layers_L)} layers vs shape {(L, N, K)}")
        for name in ("token_N", "next_N", "predicted_N", "source_N", "modality_N", "row_N"):
            if getattr(self, name).shape != (N,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({N},)")
        if N and int(self.experts_LNK.max()) >= self.num_experts:
            problems.append(f"an expert id >= num_experts={self.num_experts}")
        if N and int(self.source_N.max()) >= len(self.sources):
            problems.append(f"a source index >= {len(self.sources)} sources")
        if problems:
            raise RoutingRecordsError(f"{where}: inconsistent routing records: {problems[0]}")


def _expert_dtype(num_experts: int) -> type:
    return np.uint8 if num_experts <= 256 else np.uint16


def save_records(records: RoutingRecords, path: str | Path) -> Path:
    """Write `records` to `path` (.npz) through a temp file, so readers never see half a file."""
    path = Path(path)
    records.validate(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    columns = {
        "experts_LNK": records.experts_LNK.astype(_expert_dtype(records.num_experts)),
        "weights_LNK": records.weights_LNK.astype(np.float16),
        "token_N": records.token_N.astype(np.int32), "next_N": records.next_N.astype(np.int32),
        "predicted_N": records.predicted_N.astype(np.int32),
        "source_N": records.source_N.astype(np.int16),
        "modality_N": records.modality_N.astype(np.int8), "row_N": records.row_N.astype(np.int32),
        "layers_L": np.asarray(records.layers_L, dtype=np.int32),
    }
    with tmp.open("wb") as f:
        np.savez(f, meta=np.array(json.dumps(records.meta())), **columns)
    tmp.replace(path)
    return path


def load_records(path: str | Path) -> RoutingRecords:
    """Read a file written by `save_records`; a truncated, foreign or inconsistent file raises
    `RoutingRecordsError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise RoutingRecordsError(f"routing records {path} do not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            columns = {name: z[name] for name in _COLUMNS}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as err:
        raise RoutingRecordsError(f"routing records {path} are truncated or not an mmfm routing "
                                  f"file ({type(err).__name__})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise RoutingRecordsError(f"{path} is not {FORMAT} version {VERSION}")
    known = ("format", "version", "step", "num_experts", "top_k", "sources", "modalities",
             "expert_groups")
    groups = meta.get("expert_groups")
    records = RoutingRecords(
        step=int(meta["step"]), num_experts=int(meta["num_experts"]), top_k=int(meta["top_k"]),
        sources=list(meta["sources"]),
        expert_groups={k: (int(a), int(n)) for k, (a, n) in groups.items()} if groups else None,
        extra={k: v for k, v in meta.items() if k not in known},
        **columns)
    records.validate(str(path))
    return records


def records_paths(folder: str | Path) -> list[Path]:
    """Records files in `folder`, in step order (names are `step_XXXXXXXX.npz`)."""
    folder = Path(folder)
    return sorted(folder.glob("step_*.npz")) if folder.is_dir() else []
