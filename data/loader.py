"""Training and validation loaders over token shards, with exact, checkpointable state.

Shape legend: B = micro batch size, T = seq_len.

**Packing.** Each reader (one per rank and DataLoader worker) runs B *lanes*, one per row
of the micro batch. Lane r reads documents r, r+B, r+2B, ... of each of its shards (in the
shard's shuffled order), concatenates them (each already ending in ``<|endoftext|>``) into one
token stream and cuts it into rows of T+1 tokens; ``input_ids = row[:-1]``,
``labels = row[1:]``. So the B rows of a batch come from B different documents: a long
document (a play, a large source file) continues in the same row of the next batches instead
of filling whole batches, which would make consecutive batches near-copies of each other.
Rows do not overlap, so every token of every document appears in exactly one row per epoch,
in order. Nothing is dropped or padded in training.

**Document boundaries.** ``doc_ids[b, t]`` numbers the documents within row b (0, 1, ...),
so attention can be restricted to a block-diagonal causal mask
(:meth:`Batch.block_causal_mask`): no token attends across a document boundary. The label
at an ``<|endoftext|>`` position is the first token of the next document and is kept, as
GPT-style packing does: under the document mask that EOS sees only its own document, so
the target teaches "what a document starts with" without leaking the previous text. The
first token of a row has no input position (it is only ever a label of the previous row)
and so is never predicted from a truncated context of its own doc piece; a document cut
by a row boundary continues with doc id 0 in the next row and cannot see its beginning.

**Order and sharding.** Each epoch the shard list is shuffled with ``(seed, epoch)``, split
by rank (``shards[rank::world_size]``) and then by DataLoader worker; within a shard, the
document order is shuffled with ``(seed, epoch, shard)``. A worker's stream runs on into the
next epoch without a break, so the loader is an infinite iterator.

**Length schedule.** With ``seq_len_stages`` (``train.seq_len_schedule``) the row length and
the rows per batch change at given micro-batch indices. A reader then runs as many lanes as
the largest batch has rows, and each batch takes its rows from the next lanes in turn (a
cursor that wraps): 8 lanes feeding 2 rows of 4x the length serve lanes 0-1, 2-3, 4-5, 6-7,
0-1, ... Every lane's stream continues where it stopped and is cut into rows of the length
now due, so across a switch no token is skipped or read twice, and ``doc_ids`` restart at 0
in every row as before. Without a schedule the cursor stays at 0 and every lane gives one
row per batch, the layout described above.

**Exact resume.** A lane's position is ``(epoch, shard, doc, offset)``: the next token it
would read; a worker's position is its lanes' positions. Each worker sends that position along with every batch, and the loader keeps
the position of the last batch it *returned* per worker (prefetched batches do not count),
plus which worker is due next. Torch's DataLoader returns an IterableDataset's batches
round-robin from its workers, so on resume physical worker 0 plays the saved "next" worker
and the sequence continues exactly. A worker's position also holds its lane cursor, and the
loader counts the batches it returned, which fixes each future batch's stage.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmfm.data.shards import iter_shard_docs, read_index
from mmfm.data.tar_scan import ShardError
from mmfm.errors import UserValueError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value have no target (torch cross_entropy default)
STATE_VERSION = 2


@dataclass
class Batch:
    """One micro batch. ``input_ids``/``labels``: (B, T) int64; ``doc_ids``: (B, T) int32.

    Validation batches also say where each token came from: ``source_ids`` (B, T) int16 indexes
    ``sources`` (the shard index's source names; "unknown" for documents written without one),
    -1 on padding. Training batches leave them empty (None, ())."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    source_ids: torch.Tensor | None = None
    sources: tuple[str, ...] = ()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        source_ids = (None if self.source_ids is None
                      else self.source_ids.to(device, non_blocking=non_blocking))
        return Batch(*(t.to(device, non_blocking=non_blocking)
                       for t in (self.input_ids, self.labels, self.doc_ids)),
                     source_ids=source_ids, sources=self.sources)

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (what torch's DataLoader calls to pin it)."""
        return Batch(*(t.pin_memory() for t in (self.input_ids, self.labels, self.doc_ids)))

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def block_causal_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query t may attend key s: s <= t, same document.

        Shaped for ``scaled_dot_product_attention(attn_mask=...)`` (broadcast over heads).
        """
        T = self.doc_ids.shape[1]
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()
        same_doc_BTT = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        return (same_doc_BTT & causal_TT)[:, None]


# ----------------------------------------------------------------------------- plans

def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Indices of the shards in the order all ranks read them in `epoch`."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def reader_shards(
    num_shards: int, seed: int, epoch: int, rank: int, world_size: int, worker: int,
    num_workers: int,
) -> list[int]:
    """The shard indices one (rank, worker) reads in `epoch`: by rank, then by worker."""
    return epoch_shard_order(num_shards, seed, epoch)[rank::world_size][worker::num_workers]


def _doc_order(num_docs: int, seed: int, epoch: int, shard: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, shard, 1]).permutation(num_docs)


def _check_vocab(index: dict[str, Any], vocab_size: int | None, shards_dir: Path) -> None:
    # A model vocabulary larger than the tokenizer's is harmless (unused rows, e.g. padding
    # to a multiple of 64); a smaller one would index out of range. A different tokenizer of
    # the same size is caught by comparing index["tokenizer_sha256"].
    if vocab_size is not None and index["vocab_size"] > vocab_size:
        raise UserValueError(
            f"tokenizer/model vocabulary mismatch: shards in {shards_dir} were written with a "
            f"tokenizer of vocab size {index['vocab_size']}, but the model's vocab_size is "
            f"{vocab_size}; retrain the tokenizer and shards, or set model.vocab_size="
            f"{index['vocab_size']}"
        )


# ----------------------------------------------------------------------------- checked reads

class OutOfVocabulary(ShardError):
    """A token id outside the vocabulary of the shards' index: refused even when lenient."""


def read_shard_checked(path: Path, expected: int, vocab_size: int, strict: bool,
                       skipped: dict[str, int] | None, with_meta: bool = False) -> list:
    """The token ids of every sample of one shard (with `with_meta`, (ids, metadata) pairs),
    compared with the index's count.

    Damage (a broken tar, a truncated file) and a count that differs from the index are
    counted in `skipped` and logged (lenient) or raise ShardError naming the shard and byte
    (strict). A token id outside [0, vocab_size) is always refused: it would index past the
    embedding (or silently train on another token)."""
    docs: list[np.ndarray] = []
    try:
        for key, ids, meta in iter_shard_docs(path):
            _check_ids(ids, vocab_size, path, key)
            docs.append((ids, meta) if with_meta else ids)
    except ShardError as err:
        if strict or isinstance(err, OutOfVocabulary):
            raise
        _count(skipped, "bad_shard", 1)
        log.warning("%s; skipped the rest of the shard", err)
    if len(docs) != expected:
        message = f"shard {path}: read {len(docs)} samples but its index lists {expected}"
        if strict:
            raise ShardError(message)
        _count(skipped, "index_mismatch_samples", abs(expected - len(docs)))
        log.warning(message)
    return docs


def _check_ids(ids: np.ndarray, vocab_size: int, path: Path, key: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise OutOfVocabulary(f"shard {path}: sample {key!r} holds token id {bad}, outside the "
                         f"vocabulary [0, {vocab_size}) of its index")


def _count(skipped: dict[str, int] | None, reason: str, n: int) -> None:
    if skipped is not None:
        skipped[reason] = skipped.get(reason, 0) + n


# ----------------------------------------------------------------------------- packing

class _PackedStream:
    """One lane of a reader: an endless token stream cut into rows; its position is exact and
    small. Lane r of L reads documents r, r+L, r+2L, ... of each shard's shuffled order, so the
    L rows of a batch come from L different documents and one long document (a play, a large
    source file) never fills whole batches in a row."""

    def __init__(
        self, shards_dir: Path, names: list[str], seed: int, rank: int, world_size: int,
        worker: int, num_workers: int, row_len: int, position: dict[str, int] | None,
        lane: int = 0, lanes: int = 1, checks: dict[str, Any] | None = None,
        skipped: dict[str, int] | None = None,
    ) -> None:
        self.dir, self.names, self.seed, self.row_len = shards_dir, names, seed, row_len
        # {"samples": per-shard counts from the index, "vocab_size", "strict"}; `skipped` is
        # given to one lane only, as every lane reads the whole shard.
        self.checks, self.skipped = checks, skipped
        self.split = (rank, world_size, worker, num_workers)
        self.lane, self.lanes = lane, lanes
        self._empty_epochs = 0  # epochs in a row that gave this lane no document
        pos = position or {"epoch": 0, "shard": 0, "doc": 0, "offset": 0}
        self.epoch, self.shard, self.doc, self.offset = (
            pos["epoch"], pos["shard"], pos["doc"], pos["offset"])
        self._plan_epoch = -1
        self._plan: list[int] = []
        self._loaded: tuple[int, int] | None = None  # (epoch, shard cursor) of self._docs
        self._docs: list[np.ndarray] = []

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "doc": self.doc, "offset": self.offset}

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, doc index within the row), each of length row_len."""
        pieces: list[np.ndarray] = []
        need = self.row_len
        while need > 0:
            doc = self._current_doc()
            piece = doc[self.offset:self.offset + need]
            pieces.append(piece)
            need -= len(piece)
            self.offset += len(piece)
            if self.offset == len(doc):
                self.doc, self.offset = self.doc + 1, 0
        tokens = np.concatenate(pieces)
        doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
        return tokens, doc_ids

    def _current_doc(self) -> np.ndarray:
        while True:
            plan = self._epoch_plan()
            if self.shard >= len(plan):
                self._empty_epochs += 1
                if self._empty_epochs > 2:
                    raise UserValueError(
                        f"{self.dir}: a reader's shards hold fewer documents than the "
                        f"{self.lanes} rows of a micro batch; write more documents per shard or "
                        "lower train.micro_batch_size")
                self.epoch, self.shard, self.doc = self.epoch + 1, 0, 0
                continue
            docs = self._shard_docs(plan[self.shard])
            if self.doc < len(docs):
                self._empty_epochs = 0
                return docs[self.doc]
            self.shard, self.doc = self.shard + 1, 0

    def _epoch_plan(self) -> list[int]:
        if self._plan_epoch != self.epoch:
            self._plan = reader_shards(len(self.names), self.seed, self.epoch, *self.split)
            self._plan_epoch = self.epoch
            assert self._plan, "reader with no shards (checked by TokenLoader)"
        return self._plan

    def _shard_docs(self, shard_index: int) -> list[np.ndarray]:
        if self._loaded != (self.epoch, self.shard):
            c = self.checks
            stored = read_shard_checked(self.dir / self.names[shard_index],
                                        c["samples"][shard_index], c["vocab_size"], c["strict"],
                                        self.skipped)
            order = _doc_order(len(stored), self.seed, self.epoch, shard_index)
            self._docs = [stored[i] for i in order[self.lane::self.lanes]]
            self._loaded = (self.epoch, self.shard)
        return self._docs


def _rows_to_tensors(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    tokens_BR = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))  # R = T+1
    doc_BR = torch.from_numpy(np.stack([r[1] for r in rows]))
    return {"input_ids": tokens_BR[:, :-1].contiguous(), "labels": tokens_BR[:, 1:].contiguous(),
            "doc_ids": doc_BR[:, :-1].contiguous()}


class _PackedDataset(IterableDataset):
    """Yields {"input_ids", "labels", "doc_ids", "worker", "state"} batches forever."""

    def __init__(self, loader: TokenLoader, first_worker: int,
                 states: list[dict[str, int] | None], first_batch: int = 0) -> None:
        super().__init__()
        self.cfg = loader._reader_config()
        self.first_worker, self.states = first_worker, states
        self.first_batch = first_batch  # index of the next batch the loader returns

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n = len(self.states)
        # Physical worker 0 plays the logical worker due next, so the DataLoader's
        # round-robin order continues the saved sequence exactly.
        worker = ((info.id if info else 0) + self.first_worker) % n
        c = self.cfg
        lanes, stages = c["lanes"], c["stages"]
        saved_state = self.states[worker] or {}
        saved = saved_state.get("lanes") or [None] * lanes
        cursor = int(saved_state.get("cursor", 0))
        skipped = dict(saved_state.get("skipped") or {})
        streams = [_PackedStream(c["dir"], c["names"], c["seed"], c["rank"], c["world_size"],
                                 worker, n, stages[0][1] + 1, saved[lane], lane, lanes,
                                 c["checks"], skipped if lane == 0 else None)
                   for lane in range(lanes)]
        # The round-robin hands this worker every n-th batch, starting `due` after the next.
        batch = self.first_batch + (worker - self.first_worker) % n
        while True:
            _, seq_len, num_rows = stage_at(stages, batch)
            picked = [streams[(cursor + i) % lanes] for i in range(num_rows)]
            for stream in picked:
                stream.row_len = seq_len + 1
            rows = [stream.next_row() for stream in picked]
            cursor = (cursor + num_rows) % lanes
            batch += n
            yield {**_rows_to_tensors(rows), "worker": worker,
                   "state": {"lanes": [stream.position() for stream in streams],
                             "cursor": cursor, "skipped": dict(skipped)}}


def stage_at(stages: list[tuple[int, int, int]], batch: int) -> tuple[int, int, int]:
    """The (first batch, seq_len, rows) stage micro-batch `batch` (0-based) belongs to."""
    return stages[bisect.bisect_right([s[0] for s in stages], batch) - 1]


# ----------------------------------------------------------------------------- loaders

class TokenLoader:
    """Infinite iterator of packed training :class:`Batch` es for one rank.

    ``next(loader)`` starts the workers lazily; :meth:`state_dict` gives the position after
    the last batch returned; :meth:`load_state_dict` (before or between batches) makes the
    next batch the one the saved loader would have returned next.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        vocab_size: int | None = None,
        tokenizer_sha256: str | None = None,
        strict: bool = False,
        pin_memory: bool = False,
        seq_len_stages: list[tuple[int, int, int]] | None = None,
    ) -> None:
        """`seq_len_stages`: [(first micro-batch, seq_len, rows), ...] from batch 0
        (`mmfm.seq_len.SeqLenSchedule.loader_stages`); None: `seq_len` and
        `micro_batch_size` throughout."""
        self.dir = Path(shards_dir)
        self.strict = strict
        self.index = read_index(self.dir)
        _check_vocab(self.index, vocab_size, self.dir)
        _check_tokenizer(self.index, tokenizer_sha256, self.dir)
        _check_positive(seq_len=seq_len, micro_batch_size=micro_batch_size,
                        world_size=world_size)
        if not 0 <= rank < world_size:
            raise UserValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_workers < 0:
            raise UserValueError(f"num_workers={num_workers} must be >= 0")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.stages = _checked_stages(seq_len_stages or [(0, seq_len, micro_batch_size)])
        self.lanes = max(rows for _, _, rows in self.stages)
        self.rank, self.world_size, self.num_workers, self.seed = (
            rank, world_size, num_workers, seed)
        # Page-locked batches from the worker processes, so a GPU copy can be non-blocking
        # (the DataLoader pins in a side thread; mmfm.device.move_batch pins the rest).
        self.pin_memory = pin_memory
        self.names = [s["name"] for s in self.index["shards"]]
        self._readers = max(1, num_workers)  # logical workers (1 in-process when 0)
        self._check_enough_shards()
        self._states: list[dict[str, int] | None] = [None] * self._readers
        self._next_worker = 0
        self._batches = 0  # batches returned so far: the next one's index
        self._it: Iterator[dict[str, Any]] | None = None

    def _check_enough_shards(self) -> None:
        readers = self.world_size * self._readers
        if len(self.names) < readers:
            raise UserValueError(
                f"{self.dir} has {len(self.names)} shard(s) but world_size={self.world_size} x "
                f"num_workers={self._readers} = {readers} readers each need at least one; "
                f"rank {self.rank} would get too few. Write more, smaller shards "
                "(mmfm data shards --docs-per-shard N) or use fewer workers"
            )

    def _reader_config(self) -> dict[str, Any]:
        return {"dir": self.dir, "names": self.names, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "stages": self.stages, "lanes": self.lanes,
                "checks": _checks(self.index, self.strict)}

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._start()
        item = next(self._it)
        self._states[item["worker"]] = dict(item["state"])
        self._next_worker = (item["worker"] + 1) % self._readers
        self._batches += 1
        return Batch(item["input_ids"], item["labels"], item["doc_ids"])

    def current_shape(self) -> tuple[int, int]:
        """(rows, seq_len) of the last batch returned (of the first one before any)."""
        _, seq_len, rows = stage_at(self.stages, max(self._batches - 1, 0))
        return rows, seq_len

    def _start(self) -> Iterator[dict[str, Any]]:
        dataset = _PackedDataset(self, self._next_worker, list(self._states), self._batches)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.pin_memory))

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        self._it = None

    @property
    def skipped(self) -> dict[str, int]:
        """Damaged shards and samples missing against the index so far (lenient mode), summed
        over this rank's workers: {"bad_shard": n, "index_mismatch_samples": m}."""
        total: dict[str, int] = {}
        for state in self._states:
            for reason, n in (state or {}).get("skipped", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self._readers,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "shards": len(self.names),
            "tokenizer_sha256": self.index.get("tokenizer_sha256"),
            "next_worker": self._next_worker,
            "worker_states": [dict(s) if s else None for s in self._states],
            "lanes": self.lanes,
            "batches": self._batches,
            "seq_len_stages": [list(s) for s in self.stages],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` on the same rank and layout."""
        expected = {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                    "num_workers": self._readers, "seed": self.seed,
                    "micro_batch_size": self.micro_batch_size, "shards": len(self.names),
                    "tokenizer_sha256": self.index.get("tokenizer_sha256"), "lanes": self.lanes}
        # Positions saved before length schedules: one lane per row, batch count unknown.
        state = {"lanes": state.get("micro_batch_size"), **state}
        if "batches" not in state and len(self.stages) > 1:
            raise UserValueError("cannot resume the data loader: its saved position predates "
                                 "sequence-length schedules, so the stage of the next batch "
                                 "is unknown; resume without train.seq_len_schedule")
        for key, value in expected.items():
            if state.get(key) != value:
                raise UserValueError(
                    f"cannot resume the data loader: it was saved with {key}={state.get(key)!r} "
                    f"but this loader has {key}={value!r} (data order would not continue)"
                )
        self.close()
        self._states = [dict(s) if s else None for s in state["worker_states"]]
        self._next_worker = int(state["next_worker"])
        self._batches = int(state.get("batches", 0))


def _checked_stages(stages: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    stages = [tuple(int(v) for v in s) for s in stages]
    if stages[0][0] != 0:
        raise UserValueError(f"seq_len_stages must start at batch 0, not {stages[0][0]}")
    for (start, seq_len, rows), previous in zip(stages, [None] + stages[:-1], strict=True):
        _check_positive(seq_len=seq_len, rows=rows)
        if previous is not None and start <= previous[0]:
            raise UserValueError(f"seq_len_stages: batch {start} does not follow {previous[0]}")
    return stages


def _checks(index: dict[str, Any], strict: bool) -> dict[str, Any]:
    return {"samples": [s["samples"] for s in index["shards"]], "vocab_size": index["vocab_size"],
            "strict": strict}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UserValueError(f"{name}={value} must be > 0")


def _check_tokenizer(index: dict[str, Any], sha: str | None, shards_dir: Path) -> None:
    if sha is not None and index.get("tokenizer_sha256") != sha:
        raise UserValueError(
            f"tokenizer mismatch: shards in {shards_dir} were written with tokenizer "
            f"{str(index.get('tokenizer_sha256'))[:12]}, the model uses {sha[:12]}"
        )


def iter_eval_batches(
    shards_dir: str | Path,
    seq_len: int,
    micro_batch_size: int,
    max_batches: int | None = None,
    vocab_size: int | None = None,
    strict: bool = False,
    skipped: dict[str, int] | None = None,
) -> Iterator[Batch]:
    """Validation batches: every call yields the same batches in the same order.

    Shards in index order, documents in stored order, packed like training; the last row
    is padded with ``<|pad|>`` (labels -100, a doc id of its own) and the last batch may
    have fewer rows. Stops after `max_batches` or at the end of the data (no repeat).
    Damage and count mismatches are counted in `skipped` (lenient) or raise (strict).
    """
    shards_dir = Path(shards_dir)
    index = read_index(shards_dir)  # checked now, not at the first next()
    _check_vocab(index, vocab_size, shards_dir)
    _check_positive(seq_len=seq_len, micro_batch_size=micro_batch_size)
    checks = {**_checks(index, strict), "skipped": skipped}
    return _eval_batches(shards_dir, index, seq_len, micro_batch_size, max_batches, checks)


def _eval_batches(
    shards_dir: Path, index: dict[str, Any], seq_len: int, micro_batch_size: int,
    max_batches: int | None, checks: dict[str, Any],
) -> Iterator[Batch]:
    if max_batches is not None and max_batches <= 0:
        return
    sources = source_names(index)
    rows: list[_EvalRow] = []
    emitted = 0
    for row in _eval_rows(shards_dir, index, seq_len + 1, checks, sources):
        rows.append(row)
        if len(rows) == micro_batch_size:
            yield _eval_batch(rows, sources)
            emitted, rows = emitted + 1, []
            if emitted == max_batches:
                return
    if rows:
        yield _eval_batch(rows, sources)


UNKNOWN_SOURCE = "unknown"  # the source of documents written without one (older shards)


def source_names(index: dict[str, Any]) -> tuple[str, ...]:
    """The sources a shard set holds, sorted: the keys of its index's per-source counts, or
    just "unknown" for an index written before sources were counted."""
    return tuple(sorted(index.get("sources") or {UNKNOWN_SOURCE: None}))


# (tokens, doc ids, source index per token, number of pad tokens)
_EvalRow = tuple[np.ndarray, np.ndarray, np.ndarray, int]


def _eval_rows(shards_dir: Path, index: dict[str, Any], row_len: int, checks: dict[str, Any],
               sources: tuple[str, ...]) -> Iterator[_EvalRow]:
    pieces: list[tuple[np.ndarray, int]] = []
    filled = 0
    for shard in index["shards"]:
        docs = read_shard_checked(shards_dir / shard["name"], shard["samples"],
                                  checks["vocab_size"], checks["strict"], checks["skipped"],
                                  with_meta=True)
        for ids, meta in docs:
            source = _source_index(meta, sources)
            offset = 0
            while offset < len(ids):
                piece = ids[offset:offset + row_len - filled]
                pieces.append((piece, source))
                filled, offset = filled + len(piece), offset + len(piece)
                if filled == row_len:
                    yield _make_row(pieces, 0)
                    pieces, filled = [], 0
    if filled:
        # The pad run gets a doc id of its own, so no real token ever attends to it.
        pieces.append((np.full(row_len - filled, index["pad_id"], dtype=np.int32), -1))
        yield _make_row(pieces, row_len - filled)


def _source_index(meta: dict[str, Any], sources: tuple[str, ...]) -> int:
    name = str(meta.get("source", UNKNOWN_SOURCE))
    if name in sources:
        return sources.index(name)
    # A document whose source the index does not list (hand-edited shards) counts as unknown.
    return sources.index(UNKNOWN_SOURCE) if UNKNOWN_SOURCE in sources else -1


def _make_row(pieces: list[tuple[np.ndarray, int]], n_pad: int) -> _EvalRow:
    lengths = [len(p) for p, _ in pieces]
    doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)
    source_ids = np.repeat(np.array([s for _, s in pieces], dtype=np.int16), lengths)
    tokens = np.concatenate([p for p, _ in pieces]).astype(np.int64)
    return tokens, doc_ids, source_ids, n_pad


def _eval_batch(rows: list[_EvalRow], sources: tuple[str, ...]) -> Batch:
    tokens_BR = torch.from_numpy(np.stack([r[0] for r in rows]))  # R = T+1
    doc_BR = torch.from_numpy(np.stack([r[1] for r in rows]))
    source_BR = torch.from_numpy(np.stack([r[2] for r in rows]))
    labels_BT = tokens_BR[:, 1:].clone()
    for b, (_, _, _, n_pad) in enumerate(rows):
        if n_pad:
            labels_BT[b, -n_pad:] = IGNORE_INDEX
    return Batch(tokens_BR[:, :-1].contiguous(), labels_BT, doc_BR[:, :-1].contiguous(),
                 source_ids=source_BR[:, :-1].contiguous(), sources=sources)
