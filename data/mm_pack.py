"""Interleaved documents -> token ids with placeholder runs -> packed rows -> batches.

Shape legend: B rows per batch, T = seq_len, R = T + 1 tokens per row.

**Tokens.** A decoded document ``[("text", str) | ("image", PIL) | ("audio", Waveform)]``
becomes its text tokens with, for each media item, the run
``<|image_start|> <|image|> x n <|image_end|>`` (or the audio tokens), n being the item's
token count from its preprocessor, and ``<|endoftext|>`` at the end.

**Targets.** Every token carries a *target group*, the modality whose loss it counts toward
when it is a label: text before any media is group 0 ("text"), text after an image is
group 1 (captions: "image"), text after audio is group 2 (transcripts: "audio"). Placeholder
tokens are never targets (-1); the start/end markers are targets of their modality only
with ``loss_on_markers``.

**Packing.** Documents are packed back to back into rows of R tokens (``input_ids =
row[:-1]``, ``labels = row[1:]``) like the text loader, but a row is never cut inside a
media run: if the next run does not fit in the rest of the row, the row is padded with
``<|pad|>`` (no targets, a doc id of its own) and the run starts the next row. So every
placeholder sits at an input position and each item's run is whole within one row. A run
longer than a row cannot be packed (``SampleError("media_too_long")``).

**Sources.** Validation batches say which shard set (``multimodal.sources.<name>``) each token
came from, as text validation batches say which source: ``source_ids`` (B, T) int16 indexes
``sources``, -1 on padding. The shard set's name is the source, not the ``source`` field of each
document's json: the shard sets are what a config mixes and weighs, so ``val/loss/<set>`` and
the routing reports line up with them. Training batches leave them empty (None, ()).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmfm.data.mm_shards import SampleError
from mmfm.data.tokenizer import (
    AUDIO,
    AUDIO_END,
    AUDIO_START,
    EOS,
    IMAGE,
    IMAGE_END,
    IMAGE_START,
    PAD,
    encode_plain,
    special_token_ids,
)
from mmfm.encoders.media import MODALITY_IDS, MediaTensors

IGNORE_INDEX = -100
NO_TARGET = -1
_MARKERS = {"image": (IMAGE_START, IMAGE, IMAGE_END), "audio": (AUDIO_START, AUDIO, AUDIO_END)}


@dataclass
class TokenizedDoc:
    tokens: np.ndarray  # (n,) int64 token ids
    groups: np.ndarray  # (n,) int8 target group of each token as a label (-1: no target)
    spans: list[tuple[int, int]]  # [start, end) of each media run, markers included
    media: list[tuple[str, Tensor, int]]  # (modality, preprocessed item, tokens), per span
    source: int = -1  # index of its shard set in the batches' `sources` (-1: not tracked)


@dataclass
class MMBatch:
    """One micro batch. (B, T) int64 `input_ids`/`labels`, int32 `doc_ids`, int8
    `target_groups` (group of each label, -1 none), and each modality's media in the order
    of its placeholder runs (row-major). Validation batches also carry (B, T) int16
    `source_ids` indexing `sources` (shard-set names), -1 on padding, like `Batch`."""

    input_ids: Tensor
    labels: Tensor
    doc_ids: Tensor
    target_groups: Tensor
    media: dict[str, MediaTensors] = field(default_factory=dict)
    source_ids: Tensor | None = None
    sources: tuple[str, ...] = ()

    def to(self, device, non_blocking: bool = False) -> MMBatch:
        move = [t.to(device, non_blocking=non_blocking) for t in
                (self.input_ids, self.labels, self.doc_ids, self.target_groups)]
        source_ids = (None if self.source_ids is None
                      else self.source_ids.to(device, non_blocking=non_blocking))
        return MMBatch(*move, media={m: v.to(device, non_blocking) for m, v in self.media.items()},
                       source_ids=source_ids, sources=self.sources)

    def pin_memory(self) -> MMBatch:
        """The batch in page-locked host memory (what torch's DataLoader calls to pin it)."""
        pinned = [t.pin_memory() for t in
                  (self.input_ids, self.labels, self.doc_ids, self.target_groups)]
        source_ids = None if self.source_ids is None else self.source_ids.pin_memory()
        return MMBatch(*pinned, media={m: v.pin_memory() for m, v in self.media.items()},
                       source_ids=source_ids, sources=self.sources)

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class DocTokenizer:
    """Decoded segments -> :class:`TokenizedDoc`, with the configured preprocessors."""

    def __init__(self, tokenizer, preprocessors: dict[str, Any], max_run: int,
                 loss_on_markers: bool = False) -> None:
        self.tok, self.pre, self.max_run = tokenizer, preprocessors, max_run
        self.loss_on_markers = loss_on_markers
        self.ids = special_token_ids(tokenizer)

    @property
    def pad_id(self) -> int:
        return self.ids[PAD]

    def __call__(self, segments: list[tuple[str, Any]]) -> TokenizedDoc:
        with single_thread():
            return self._tokenize(segments)

    def _tokenize(self, segments: list[tuple[str, Any]]) -> TokenizedDoc:
        texts = [v for k, v in segments if k == "text"]
        encoded = iter(encode_plain(self.tok, texts)) if texts else iter(())
        tokens: list[np.ndarray] = []
        groups: list[np.ndarray] = []
        spans, media, ctx, n = [], [], 0, 0
        for kind, value in segments:
            if kind == "text":
                ids = np.asarray(next(encoded), dtype=np.int64)
                piece_groups = np.full(len(ids), ctx, dtype=np.int8)
            else:
                ids, piece_groups, item = self._media_run(kind, value)
                spans.append((n, n + len(ids)))
                media.append(item)
                ctx = MODALITY_IDS[kind]
            tokens.append(ids)
            groups.append(piece_groups)
            n += len(ids)
        tokens.append(np.array([self.ids[EOS]], dtype=np.int64))
        groups.append(np.array([ctx], dtype=np.int8))
        return TokenizedDoc(np.concatenate(tokens), np.concatenate(groups), spans, media)

    def _media_run(self, kind: str, value: Any) -> tuple[np.ndarray, np.ndarray, tuple]:
        if kind not in self.pre:
            raise SampleError("unsupported_media", f"the document holds {kind} but no {kind} "
                                                   "encoder is configured")
        count = int(self.pre[kind].num_tokens(value))
        if count + 2 > self.max_run:
            raise SampleError("media_too_long", f"{kind} needs {count} placeholder tokens + 2 "
                                                f"markers, more than a row of {self.max_run}")
        start, ph, end = (self.ids[t] for t in _MARKERS[kind])
        ids = np.array([start] + [ph] * count + [end], dtype=np.int64)
        marker = MODALITY_IDS[kind] if self.loss_on_markers else NO_TARGET
        groups = np.full(len(ids), NO_TARGET, dtype=np.int8)
        groups[0] = groups[-1] = marker
        return ids, groups, (kind, self.pre[kind].preprocess(value), count)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread: preprocessing a clip or an image is many small ops, which
    intra-op threads slow down badly when the cores are shared (in-process loading, or a
    busy machine: 100 ms vs 2 ms per clip measured here). Worker processes already use one."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Row:
    tokens: np.ndarray  # (R,)
    groups: np.ndarray  # (R,)
    doc_ids: np.ndarray  # (R,) int32
    media: list[tuple[str, Tensor, int]]
    source_ids: np.ndarray | None = None  # (R,) int16 shard-set index, -1 on padding


class Packer:
    """Cuts a stream of documents into rows of `row_len` tokens, never inside a media run.

    `next_doc()` returns the next :class:`TokenizedDoc` (None at the end of finite data).
    The position within the current document is `(doc, offset)`; a resumed packer gets the
    same document back (re-decoded) and its offset."""

    def __init__(self, row_len: int, pad_id: int, next_doc: Callable[[], TokenizedDoc | None]) -> None:
        self.row_len, self.pad_id, self.next_doc = row_len, pad_id, next_doc
        self.doc: TokenizedDoc | None = None
        self.offset = 0
        self.exhausted = False

    def next_row(self) -> Row | None:
        """The next full row (padded only before a run that does not fit, or at the end of
        finite data); None when the data is exhausted and nothing is pending."""
        pieces: list[tuple[TokenizedDoc, int, int]] = []
        filled = 0
        while filled < self.row_len and self._current() is not None:
            doc, start = self.doc, self.offset
            end = _cut(doc, start, start + self.row_len - filled)
            if end == start:
                break  # the next media run needs a fresh row
            pieces.append((doc, start, end))
            filled += end - start
            self.offset = end
            if end == len(doc.tokens):
                self.doc, self.offset = None, 0
        return self._row(pieces, filled) if pieces else None

    def _current(self) -> TokenizedDoc | None:
        if self.doc is None and not self.exhausted:
            self.doc, self.offset = self.next_doc(), 0
            self.exhausted = self.doc is None
        return self.doc

    def _row(self, pieces: list[tuple[TokenizedDoc, int, int]], filled: int) -> Row:
        tokens = [d.tokens[a:b] for d, a, b in pieces]
        groups = [d.groups[a:b] for d, a, b in pieces]
        lengths = [b - a for _, a, b in pieces]
        sources = [d.source for d, _, _ in pieces]
        if filled < self.row_len:
            tokens.append(np.full(self.row_len - filled, self.pad_id, dtype=np.int64))
            groups.append(np.full(self.row_len - filled, NO_TARGET, dtype=np.int8))
            lengths.append(self.row_len - filled)
            sources.append(-1)
        doc_ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
        source_ids = np.repeat(np.array(sources, dtype=np.int16), lengths)
        media = [item for d, a, b in pieces
                 for (s, e), item in zip(d.spans, d.media, strict=True)
                 if a <= s and e <= b]
        return Row(np.concatenate(tokens), np.concatenate(groups), doc_ids, media, source_ids)


def _cut(doc: TokenizedDoc, start: int, limit: int) -> int:
    """The largest end <= limit (and <= len) such that [start, end) cuts no media run."""
    end = min(limit, len(doc.tokens))
    for s, e in doc.spans:
        if s < end < e:
            return max(start, s)
    return end


def collate_rows(rows: list[Row], preprocessors: dict[str, Any],
                 sources: tuple[str, ...] = ()) -> MMBatch:
    """Rows -> MMBatch; media of each modality padded by its preprocessor's collate. Given the
    shard-set names `sources` (validation), the batch carries each token's source id."""
    tokens_BR = torch.from_numpy(np.stack([r.tokens for r in rows]))
    groups_BR = torch.from_numpy(np.stack([r.groups for r in rows]))
    doc_BR = torch.from_numpy(np.stack([r.doc_ids for r in rows]))
    labels_BT = tokens_BR[:, 1:].masked_fill(groups_BR[:, 1:] < 0, IGNORE_INDEX)
    media = {}
    for modality, pre in preprocessors.items():
        items = [(x, n) for r in rows for m, x, n in r.media if m == modality]
        data, lengths = pre.collate([x for x, _ in items])
        media[modality] = MediaTensors(data, lengths,
                                       torch.tensor([n for _, n in items], dtype=torch.long),
                                       fingerprint=getattr(pre, "fingerprint", None))
    source_ids = None
    if sources:
        source_ids = torch.from_numpy(np.stack([r.source_ids for r in rows]))[:, :-1].contiguous()
    return MMBatch(tokens_BR[:, :-1].contiguous(), labels_BT.contiguous(),
                   doc_BR[:, :-1].contiguous(), groups_BR[:, 1:].contiguous(), media,
                   source_ids=source_ids, sources=tuple(sources))
