"""Routing capture: run held-out tokens through a model and write routing records.

Two entry points:

* `record_routing(model, batch, step, out_path)`: the trainer's hook, called every
  `metrics.routing_trace_every` steps on one fixed small batch (`routing_sample_batch`);
  writes `RUN/routing/train/step_XXXXXXXX.npz`.
* `analyze_run(run_dir, ...)` (`mmfm analyze RUN`): each chosen checkpoint through the same
  held-out tokens; writes `RUN/routing/heldout/step_XXXXXXXX.npz`.

Both run in eval mode without gradients, in fp32 (the CPU here has no fast bf16).

Shape legend: B batch, T sequence, N = B*T tokens, L MoE layers, K experts per token, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmfm.errors import UserValueError
from mmfm.moe.capture import RoutingCapture, capture_routing
from mmfm.report.records import RoutingRecords, save_records
from mmfm.train.checkpoint import CheckpointError, list_checkpoints

ROUTING_DIR = "routing"
TRAIN_SAMPLES = "train"  # RUN/routing/train: samples taken while training
HELDOUT = "heldout"  # RUN/routing/heldout: `mmfm analyze` over checkpoints


def records_path(run_dir: str | Path, kind: str, step: int) -> Path:
    """Where the records of `step` of this `kind` (train / heldout) live in a run folder."""
    return Path(run_dir) / ROUTING_DIR / kind / f"step_{step:08d}.npz"


@dataclass
class _Columns:
    """Per-token columns gathered batch after batch (numpy), and the source names seen."""

    tokens: list[np.ndarray] = field(default_factory=list)
    nexts: list[np.ndarray] = field(default_factory=list)
    predicted: list[np.ndarray] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)
    modality: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    num_rows: int = 0

    def source_index(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)


def _batch_sources_N(batch: Any, cols: _Columns, source_name: str | None) -> np.ndarray:
    """Each token's index into `cols.names`: the batch's own sources, renamed to `source_name`
    when one is given (`--data NAME=SHARDS`), "unknown" when the batch says nothing."""
    B, T = batch.input_ids.shape
    if source_name is not None:
        return np.full(B * T, cols.source_index(source_name), dtype=np.int16)
    ids = getattr(batch, "source_ids", None)
    names = getattr(batch, "sources", ())
    if ids is None or not names:
        return np.full(B * T, cols.source_index("unknown"), dtype=np.int16)
    lookup = np.array([cols.source_index(n) for n in names] + [-1], dtype=np.int16)
    return lookup[ids.reshape(-1).numpy().astype(np.int64)]  # -1 (padding) -> last entry, -1


def _modality_N(model: nn.Module, input_ids_BT: Tensor) -> np.ndarray:
    """0 text, 1 image, 2 audio: placeholder tokens carry their medium's modality."""
    if hasattr(model, "modality_ids"):
        return model.modality_ids(input_ids_BT).reshape(-1).numpy().astype(np.int8)
    return np.zeros(input_ids_BT.numel(), dtype=np.int8)


def _forward(model: nn.Module, batch: Any, document_mask: bool) -> Tensor:
    """Logits (B, T, V) of one batch, text or multimodal."""
    doc_ids = batch.doc_ids if document_mask else None
    if hasattr(batch, "media"):
        return model(batch.input_ids, doc_ids, batch.media).logits
    return model(batch.input_ids, doc_ids).logits


@torch.no_grad()
def capture_records(model: nn.Module, batches: Iterable[tuple[Any, str | None]], step: int,
                    max_tokens: int | None = None, document_mask: bool = True,
                    extra: dict[str, Any] | None = None) -> RoutingRecords:
    """Routing of every token of `batches` ((batch, source name or None) pairs) through every
    MoE layer of `model`, stopping after the batch that reaches `max_tokens`."""
    was_training = model.training
    model.eval()
    cols = _Columns()
    try:
        with capture_routing(model) as capture:
            for batch, source_name in batches:
                _add_batch(model, batch, source_name, cols, document_mask)
                if max_tokens is not None and sum(map(len, cols.tokens)) >= max_tokens:
                    break
    finally:
        model.train(was_training)
    if not cols.tokens:
        raise UserValueError("no held-out tokens to capture routing on")
    return _to_records(capture, cols, step, max_tokens, extra or {})


def _add_batch(model: nn.Module, batch: Any, source_name: str | None, cols: _Columns,
               document_mask: bool) -> None:
    B, T = batch.input_ids.shape
    logits_BTV = _forward(model, batch, document_mask)
    labels_N = batch.labels.reshape(-1).numpy().astype(np.int32)
    cols.tokens.append(batch.input_ids.reshape(-1).numpy().astype(np.int32))
    cols.nexts.append(np.where(labels_N < 0, -1, labels_N))
    cols.predicted.append(logits_BTV.argmax(-1).reshape(-1).numpy().astype(np.int32))
    cols.sources.append(_batch_sources_N(batch, cols, source_name))
    cols.modality.append(_modality_N(model, batch.input_ids))
    cols.rows.append(np.repeat(np.arange(cols.num_rows, cols.num_rows + B, dtype=np.int32), T))
    cols.num_rows += B


def _to_records(capture: RoutingCapture, cols: _Columns, step: int, max_tokens: int | None,
                extra: dict[str, Any]) -> RoutingRecords:
    layers = sorted(capture.layers)
    first = capture.layers[layers[0]]
    n = sum(map(len, cols.tokens)) if max_tokens is None else max_tokens
    experts, weights = zip(*(capture.layers[i].cat() for i in layers), strict=True)
    experts_LNK = torch.stack(experts).numpy()[:, :n]
    weights_LNK = torch.stack(weights).numpy()[:, :n]
    n = experts_LNK.shape[1]
    column = {name: np.concatenate(getattr(cols, name))[:n]
              for name in ("tokens", "nexts", "predicted", "sources", "modality", "rows")}
    return RoutingRecords(
        step=step, num_experts=first.num_experts, top_k=first.top_k,
        layers_L=np.asarray(layers, dtype=np.int32), experts_LNK=experts_LNK,
        weights_LNK=weights_LNK, token_N=column["tokens"], next_N=column["nexts"],
        predicted_N=column["predicted"], source_N=column["sources"],
        modality_N=column["modality"], row_N=column["rows"], sources=cols.names or ["unknown"],
        expert_groups=first.groups, extra=extra)


def record_routing(model: nn.Module, batch: Any, step: int, out_path: str | Path,
                   document_mask: bool = True) -> Path:
    """The trainer's hook: write the routing of one fixed `batch` at `step` to `out_path`
    (use `records_path(run_dir, TRAIN_SAMPLES, step)`). The model is left in the mode it
    was in; no gradient is recorded."""
    records = capture_records(model, [(batch, None)], step, document_mask=document_mask,
                              extra={"kind": TRAIN_SAMPLES})
    return save_records(records, out_path)


def routing_sample_batch(eval_batches: Iterable[Any], tokens: int) -> Any:
    """The trainer's fixed routing batch: the first validation rows holding at least `tokens`
    tokens (`metrics.routing_trace_tokens`). A multimodal batch (media tied to its rows) is
    taken whole: the first one."""
    from mmfm.data.loader import Batch

    taken: list[Any] = []
    for batch in eval_batches:
        if not isinstance(batch, Batch):
            return batch
        taken.append(batch)
        if sum(b.input_ids.numel() for b in taken) >= tokens:
            break
    if not taken:
        raise UserValueError("the validation data yielded no batch to sample routing on")
    fields = ("input_ids", "labels", "doc_ids", "source_ids")
    rows = tokens // taken[0].input_ids.shape[1] + (tokens % taken[0].input_ids.shape[1] > 0)
    joined = {f: torch.cat([getattr(b, f) for b in taken])[:max(1, rows)] for f in fields}
    return Batch(**joined, sources=taken[0].sources)


# ----------------------------------------------------------------------------- mmfm analyze

def _load_model_from_checkpoint(path: Path):
    """(config, model) of a checkpoint written under any layout, eval mode, fp32."""
    from mmfm.train.checkpoint import load_model_from_checkpoint

    cfg, model = load_model_from_checkpoint(path)
    return cfg, model.float().eval()


def select_checkpoints(run_dir: Path, which: Sequence[str]) -> list[Path]:
    """Checkpoint folders of a run, oldest first: `all`, `latest` or step numbers."""
    found = sorted(list_checkpoints(run_dir / "checkpoints"))
    if not found:
        raise CheckpointError(f"run {run_dir} has no checkpoints in {run_dir / 'checkpoints'}")
    if list(which) in ([], ["latest"]):
        return found[-1:]
    if list(which) == ["all"]:
        return found
    by_step = {int(p.name.removeprefix("step_")): p for p in found}
    try:
        steps = [int(w) for w in which]
    except ValueError:
        raise UserValueError(f"--checkpoints {' '.join(which)}: use all, latest or step "
                             "numbers") from None
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise CheckpointError(f"run {run_dir} has no checkpoint for step(s) {missing}; it has "
                              f"{sorted(by_step)}")
    return [by_step[s] for s in sorted(set(steps))]


def heldout_batches(cfg, data: dict[str, str], tokens: int) -> list[tuple[Any, str | None]]:
    """The same held-out token set for every checkpoint: each `--data NAME=SHARDS` set (token
    shards, `tokens / len(data)` tokens each) or, without `--data`, the run's validation data."""
    from mmfm.data.loader import iter_eval_batches

    seq, mbs = cfg.data.seq_len, cfg.train.micro_batch_size
    if data:
        share = max(1, tokens // len(data))
        out: list[tuple[Any, str | None]] = []
        for name, shards in data.items():
            out += [(b, name) for b in _first_tokens(
                iter_eval_batches(shards, seq, mbs, vocab_size=cfg.model.vocab_size), share)]
        return out
    if cfg.data.kind == "multimodal":
        from mmfm.train.task import build_task

        batches = build_task(cfg).eval_batches()
    else:
        batches = balanced_rows(iter_eval_batches(cfg.data.val_shards, seq, mbs,
                                                  vocab_size=cfg.model.vocab_size), tokens, mbs)
    return [(b, None) for b in _first_tokens(batches, tokens)]


def balanced_rows(batches: Iterable[Any], tokens: int, batch_size: int) -> list[Any]:
    """Validation rows re-batched so each source gets an equal share of `tokens` (by the
    majority source of each row): validation shards list sources one after another, and the
    first N tokens would often hold only the first source."""
    from mmfm.data.loader import Batch

    kept: list[tuple[Any, int]] = []
    taken: dict[int, int] = {}
    for batch in batches:
        quota = tokens // max(1, len(batch.sources))
        for r in range(batch.input_ids.shape[0]):
            ids = batch.source_ids[r]
            real = ids[ids >= 0]
            if real.numel() == 0:
                continue
            major = int(real.mode().values)
            if taken.get(major, 0) < quota:
                kept.append((batch, r))
                taken[major] = taken.get(major, 0) + int(ids.numel())
        if len(taken) == len(batch.sources) and min(taken.values()) >= quota:
            break
    out = []
    for start in range(0, len(kept), batch_size):
        group = kept[start:start + batch_size]
        out.append(Batch(*(torch.stack([getattr(b, f)[r] for b, r in group])
                           for f in ("input_ids", "labels", "doc_ids", "source_ids")),
                         sources=group[0][0].sources))
    return out


def _first_tokens(batches: Iterable[Any], tokens: int) -> list[Any]:
    out, seen = [], 0
    for batch in batches:
        out.append(batch)
        seen += batch.input_ids.numel()
        if seen >= tokens:
            break
    return out


def _check_same_model(run_cfg, ckpt_cfg, path: Path) -> None:
    """A checkpoint copied in from another run would be analysed as if it were this one."""
    if run_cfg is not None and run_cfg.model != ckpt_cfg.model:
        raise CheckpointError(f"checkpoint {path} is of another model than the run's "
                              "config.yaml (model sections differ)")


def analyze_run(run_dir: str | Path, checkpoints: Sequence[str] = ("latest",),
                tokens: int = 16384, data: dict[str, str] | None = None) -> list[Path]:
    """`mmfm analyze`: routing records of the same held-out tokens through each chosen
    checkpoint, written to RUN/routing/heldout/step_XXXXXXXX.npz; returns the paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserValueError(f"run folder {run_dir} does not exist")
    if tokens <= 0:
        raise UserValueError(f"--tokens={tokens} must be > 0")
    run_cfg = _run_config(run_dir)
    written, batches = [], None
    for path in select_checkpoints(run_dir, checkpoints):
        cfg, model = _load_model_from_checkpoint(path)
        _check_same_model(run_cfg, cfg, path)
        if cfg.model.moe is None:
            raise UserValueError(f"checkpoint {path} is of a dense model (model.moe: null): "
                                 "it has no MoE layers to analyse")
        batches = batches if batches is not None else heldout_batches(cfg, data or {}, tokens)
        records = capture_records(model, batches, int(path.name.removeprefix("step_")),
                                  max_tokens=tokens, document_mask=cfg.data.document_mask,
                                  extra={"kind": HELDOUT, "checkpoint": str(path)})
        written.append(save_records(records, records_path(run_dir, HELDOUT, records.step)))
    return written


def _run_config(run_dir: Path):
    from mmfm.config import load_config

    path = run_dir / "config.yaml"
    return load_config(path) if path.is_file() else None
