"""The interleaved multimodal training loader, with exact, checkpointable state.

Pipeline, per reader (one per rank x DataLoader worker; everything below runs in the
worker, so decoding and preprocessing never block the training step)::

    shard sets (sources) ──split by rank, worker──► raw samples ──shuffle buffer──►
    mixture by source weight ──► decode + preprocess media ──► tokens with placeholder runs
    ──► pack rows (no media run cut) ──► collate (padded media batch) ──► MMBatch

**Split.** Each epoch a source's shards are permuted with (seed, source, epoch). With at
least as many shards as readers, reader (rank, worker) reads ``perm[rank::world][worker::W]``;
with fewer, every reader scans all shards and keeps the samples with
``(shard + index) % readers == reader``. Either way the readers' samples are disjoint and
together cover the source every epoch.

**Shuffle buffer.** Per source, a buffer of `shuffle_buffer` raw samples; each draw picks a
slot with an RNG keyed by (seed, source, reader, draw number) and refills from the stream.

**Mixture.** By default each document comes from the source furthest below its weight's
share of the tokens drawn so far, so every batch holds each source's share of tokens within
a stated tolerance (`mmfm.data.mm_mixture`); with ``mixture="sample"`` it is drawn from source
i with probability weight_i / sum, keyed by (seed, reader, draw number).

**Exact resume.** A reader's state is small and JSON-like: per source the stream position
(epoch, shard cursor, sample index), the buffer's contents as sample references
(epoch, cursor, index) and the draw counter; the mixture draw counter; the document being
packed (its reference and token offset); the skip counts. Restoring re-reads the referenced
samples from their shards and re-decodes them (decoding is deterministic), so the resumed
loader yields exactly the batches the saved one would have. Batches carry their worker's
state; the loader keeps the state of the last batch it *returned* per worker and which
worker is next, as `mmfm.data.loader.TokenLoader` does.

**Bad input.** A sample whose JSON is bad, that references a missing member, holds an
unsupported media type, a corrupt image or audio member, or nothing at all, and a shard that
is not a tar, are skipped and counted per reason (lenient) or stop the run with a
`ValueError` naming the shard and the key (strict).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmfm.data.mm_features import FeatureStore, check_caches, fill_features
from mmfm.data.mm_mixture import MIXTURE_MODES, balanced_pick, consumption
from mmfm.data.mm_pack import DocTokenizer, MMBatch, Packer, TokenizedDoc, collate_rows
from mmfm.data.mm_shards import (
    RawSample,
    SampleError,
    ShardError,
    decode_document,
    iter_raw_samples,
    read_mm_index,
)
from mmfm.data.tokenizer import load_tokenizer
from mmfm.encoders.features import CachedFeatures
from mmfm.encoders.media import DEFAULT_MAX_IMAGE_PIXELS
from mmfm.encoders.registry import build_preprocessor
from mmfm.errors import UserValueError

log = logging.getLogger(__name__)

STATE_VERSION = 1
Ref = tuple[int, int, int]  # (epoch, shard cursor in that epoch's plan, sample index in shard)
_SHUFFLE, _MIX = 1, 2  # RNG stream tags


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


@dataclass
class ShardSet:
    """One source's train (or val) shards as read from its index."""

    name: str
    dir: Path
    shards: list[str]
    weight: float = 1.0
    samples: list[int] | None = None  # per shard, from the index (None: not checked)

    @classmethod
    def open(cls, name: str, directory: str | Path, weight: float = 1.0) -> ShardSet:
        index = read_mm_index(directory)
        return cls(name, Path(directory), [s["name"] for s in index["shards"]], weight,
                   [s["samples"] for s in index["shards"]])


class BadInputPolicy:
    """Skip-and-count (lenient) or raise naming shard and key (strict)."""

    def __init__(self, strict: bool, counts: dict[str, int] | None = None) -> None:
        self.strict = strict
        self.counts: dict[str, int] = dict(counts or {})

    def sample(self, shard: Path, key: str, err: SampleError) -> None:
        if self.strict:
            raise UserValueError(f"shard {shard}: sample {key!r}: {err}") from None
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1

    def shard(self, shard: Path, err: ShardError) -> None:
        if self.strict:
            raise ShardError(str(err)) from None
        self.counts["bad_shard"] = self.counts.get("bad_shard", 0) + 1
        log.warning("%s; skipped the rest of the shard", err)

    def count(self, shard: Path, read: int, expected: int | None) -> None:
        """Compare the samples read from a whole shard with its index's count."""
        if expected is None or read == expected:
            return
        message = f"shard {shard}: read {read} samples but its index lists {expected}"
        if self.strict:
            raise ShardError(message)
        self.counts["index_mismatch_samples"] = (self.counts.get("index_mismatch_samples", 0)
                                                 + abs(expected - read))
        log.warning(message)


# ----------------------------------------------------------------------------- one source

class SourceReader:
    """One reader's endless stream of raw samples from one shard set, with an exact position."""

    def __init__(self, src: ShardSet, src_idx: int, seed: int, reader: int, readers: int,
                 rank: int, world_size: int, policy: BadInputPolicy,
                 position: list[int] | None = None) -> None:
        self.src, self.src_idx, self.seed, self.policy = src, src_idx, seed, policy
        self.reader, self.readers, self.rank, self.world_size = reader, readers, rank, world_size
        self.workers = readers // world_size
        self.by_shard = len(src.shards) >= readers
        self.epoch, self.cursor, self.index = position or (0, 0, 0)
        self._open_at: tuple[int, int] | None = None
        self._it: Iterator[RawSample] | None = None
        self._last_yield_epoch = self.epoch

    def position(self) -> list[int]:
        return [self.epoch, self.cursor, self.index]

    def plan(self, epoch: int) -> list[int]:
        """Shard indices this reader visits in `epoch`, in order."""
        perm = _rng(self.seed, self.src_idx, epoch).permutation(len(self.src.shards)).tolist()
        if not self.by_shard:
            return perm
        worker = self.reader % self.workers
        return perm[self.rank::self.world_size][worker::self.workers]

    def mine(self, shard: int, index: int) -> bool:
        return self.by_shard or (shard + index) % self.readers == self.reader

    def next_raw(self) -> tuple[Ref, RawSample]:
        while True:
            plan = self.plan(self.epoch)
            if self.cursor >= len(plan):
                self._next_epoch()
                continue
            raw = self._read_next(plan[self.cursor])
            if raw is None:
                self.cursor, self.index = self.cursor + 1, 0
                continue
            ref = (self.epoch, self.cursor, self.index)
            self.index += 1
            if self.mine(plan[self.cursor], ref[2]):
                self._last_yield_epoch = self.epoch
                return ref, raw

    def _next_epoch(self) -> None:
        if self.epoch - self._last_yield_epoch >= 1:
            raise UserValueError(f"source {self.src.name!r} ({self.src.dir}) gave reader "
                             f"{self.reader} of {self.readers} no readable sample in a whole "
                             "epoch: write more (smaller) shards or use fewer workers")
        self.epoch, self.cursor, self.index = self.epoch + 1, 0, 0

    def _read_next(self, shard: int) -> RawSample | None:
        """The sample at the current position, or None at the end of (or damage in) the shard."""
        path = self.src.dir / self.src.shards[shard]
        if self._open_at != (self.epoch, self.cursor):
            self._it, self._open_at = _skip(iter_raw_samples(path), self.index), (self.epoch, self.cursor)
        try:
            return next(self._it)
        except StopIteration:
            self._count(shard, path)
            return None
        except ShardError as err:
            self.policy.shard(path, err)
            self._count(shard, path)
            return None

    def _count(self, shard: int, path: Path) -> None:
        expected = self.src.samples[shard] if self.src.samples is not None else None
        self.policy.count(path, self.index, expected)

    def shard_path(self, ref: Ref) -> Path:
        return self.src.dir / self.src.shards[self.plan(ref[0])[ref[1]]]

    def fetch(self, refs: list[Ref]) -> list[RawSample]:
        """The raw samples at `refs` (re-read from their shards, each shard scanned once)."""
        found: dict[Ref, RawSample] = {}
        for epoch, cursor in sorted({(e, c) for e, c, _ in refs}):
            wanted = {i for e, c, i in refs if (e, c) == (epoch, cursor)}
            path = self.src.dir / self.src.shards[self.plan(epoch)[cursor]]
            for i, raw in enumerate(iter_raw_samples(path)):
                if i in wanted:
                    found[(epoch, cursor, i)] = raw
                if i >= max(wanted):
                    break
        return [found[tuple(r)] for r in refs]


def _skip(it: Iterator[RawSample], n: int) -> Iterator[RawSample]:
    for _ in range(n):
        next(it, None)
    return it


class ShuffledSource:
    """A shuffle buffer over a SourceReader; its state names the buffered samples by ref."""

    def __init__(self, reader: SourceReader, size: int, state: dict[str, Any] | None = None) -> None:
        self.reader, self.size = reader, size
        self.buffer: list[tuple[Ref, RawSample]] = []
        self.draws = 0
        if state is not None:
            refs = [tuple(r) for r in state["buffer"]]
            self.buffer = list(zip(refs, reader.fetch(refs), strict=True))
            self.draws = state["draws"]

    def next(self) -> tuple[Ref, RawSample]:
        while len(self.buffer) < self.size:
            self.buffer.append(self.reader.next_raw())
        r = self.reader
        j = int(_rng(r.seed, _SHUFFLE, r.src_idx, r.reader, self.draws).integers(len(self.buffer)))
        self.draws += 1
        item = self.buffer[j]
        self.buffer[j] = self.buffer[-1]
        self.buffer.pop()
        return item

    def state(self) -> dict[str, Any]:
        return {"position": self.reader.position(), "draws": self.draws,
                "buffer": [list(ref) for ref, _ in self.buffer]}


# ----------------------------------------------------------------------------- one reader

class ReaderPipeline:
    """Everything one (rank, worker) does: mixture of shuffled sources -> documents -> rows."""

    def __init__(self, spec: dict[str, Any], reader: int, state: dict[str, Any] | None) -> None:
        self.spec, self.reader = spec, reader
        tok = load_tokenizer(spec["tokenizer"])
        self.pre, self.undecoded = _preprocessors(spec["encoders"], spec["features"])
        self.stores = [{m: FeatureStore(src.dir, m) for m in self.undecoded}
                       for src in spec["sources"]]
        self.docs = DocTokenizer(tok, self.pre, spec["seq_len"] + 1, spec["loss_on_markers"])
        state = state or {}
        self.policy = BadInputPolicy(spec["strict"], state.get("skipped"))
        self.mix_draws = state.get("mix_draws", 0)
        self.consumed = list(state.get("consumed") or [0] * len(spec["sources"]))
        self.sources = [self._source(i, src, (state.get("sources") or [None] * len(spec["sources"]))[i])
                        for i, src in enumerate(spec["sources"])]
        total = sum(s.weight for s in spec["sources"])
        self.shares = [s.weight / total for s in spec["sources"]]
        self.weights = np.cumsum(self.shares)
        self.packer = Packer(spec["seq_len"] + 1, self.docs.pad_id, self._next_doc)
        self.carry: tuple[int, Ref] | None = None
        if state.get("carry"):
            self._restore_carry(state["carry"])

    def _source(self, i: int, src: ShardSet, st: dict[str, Any] | None) -> ShuffledSource:
        s = self.spec
        readers = s["world_size"] * s["num_readers"]
        global_reader = s["rank"] * s["num_readers"] + self.reader
        reader = SourceReader(src, i, s["seed"], global_reader, readers, s["rank"],
                              s["world_size"], self.policy, st["position"] if st else None)
        return ShuffledSource(reader, s["shuffle_buffer"], st)

    def _pick_source(self) -> int:
        if self.spec["mixture"] != "sample":
            self.mix_draws += 1
            return balanced_pick(self.shares, self.consumed)
        u = _rng(self.spec["seed"], _MIX, self.spec["rank"], self.reader, self.mix_draws).random()
        self.mix_draws += 1
        return int(np.searchsorted(self.weights, u, side="right").clip(max=len(self.sources) - 1))

    def _next_doc(self) -> TokenizedDoc:
        while True:
            s = self._pick_source()
            ref, raw = self.sources[s].next()
            doc = self._decode(s, ref, raw)
            if doc is not None:
                self.carry = (s, ref)
                self.consumed[s] += consumption(self.spec["mixture"], len(doc.tokens))
                return doc

    def _decode(self, s: int, ref: Ref, raw: RawSample) -> TokenizedDoc | None:
        try:
            segments, _ = decode_document(raw, self.spec["max_image_pixels"], self.undecoded)
            if self.undecoded:
                shard = self.sources[s].reader.shard_path(ref).name
                segments = fill_features(segments, self.stores[s], shard)
            return self.docs(segments)
        except SampleError as err:
            self.policy.sample(self.sources[s].reader.shard_path(ref), raw.key, err)
            return None

    def _restore_carry(self, carry: dict[str, Any]) -> None:
        s, ref = carry["source"], tuple(carry["ref"])
        raw = self.sources[s].reader.fetch([ref])[0]
        self.packer.doc = self._decode(s, ref, raw)
        self.packer.offset = carry["offset"]
        self.carry = (s, ref)

    def next_batch(self) -> MMBatch:
        rows = [self.packer.next_row() for _ in range(self.spec["micro_batch_size"])]
        return collate_rows(rows, self.pre)

    def state(self) -> dict[str, Any]:
        carry = None
        if self.packer.doc is not None and self.carry is not None:
            carry = {"source": self.carry[0], "ref": list(self.carry[1]),
                     "offset": self.packer.offset}
        return {"mix_draws": self.mix_draws, "consumed": list(self.consumed), "sources": [s.state() for s in self.sources],
                "carry": carry, "skipped": dict(self.policy.counts)}


class _MMDataset(IterableDataset):
    """Yields {"batch", "worker", "state"} forever; physical worker 0 plays `first_worker`."""

    def __init__(self, spec: dict[str, Any], first_worker: int, states: list[dict | None]) -> None:
        super().__init__()
        self.spec, self.first_worker, self.states = spec, first_worker, states

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first_worker) % len(self.states)
        pipeline = ReaderPipeline(self.spec, worker, self.states[worker])
        while True:
            batch = pipeline.next_batch()
            yield {"batch": batch, "worker": worker, "state": pipeline.state()}


# ----------------------------------------------------------------------------- the loader

class MMLoader:
    """Infinite iterator of packed multimodal :class:`MMBatch` es for one rank.

    `sources` are (name, train shard dir, weight) triples; `encoders` maps modality to its
    `EncoderConfig` (preprocessing only: the loader never builds the encoder weights).
    `features` maps a frozen modality to its encoder's fingerprint: when the shard sets have
    feature caches for it (`mmfm data encode`), its items are read from them instead of
    decoded (batches then carry (N, P, E) encoder outputs); stale caches are refused.
    """

    def __init__(self, sources: list[tuple[str, str | Path, float]], tokenizer: str | Path,
                 seq_len: int, micro_batch_size: int, encoders: dict[str, Any], *,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 64, strict: bool = False, loss_on_markers: bool = False,
                 vocab_size: int | None = None, pin_memory: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 features: dict[str, str] | None = None, mixture: str = "tokens") -> None:
        if not sources:
            raise UserValueError("no multimodal sources: set multimodal.sources in the config")
        if not 0 <= rank < world_size or num_workers < 0 or min(seq_len, micro_batch_size,
                                                                 shuffle_buffer) <= 0:
            raise UserValueError(f"bad loader layout: rank={rank} world_size={world_size} "
                             f"num_workers={num_workers} seq_len={seq_len} "
                             f"micro_batch_size={micro_batch_size} shuffle_buffer={shuffle_buffer}")
        if mixture not in MIXTURE_MODES:
            raise UserValueError(f"mixture={mixture!r} is not one of {', '.join(MIXTURE_MODES)}")
        sets = [ShardSet.open(n, d, w) for n, d, w in sources]
        _check_vocab(load_tokenizer(tokenizer), vocab_size, tokenizer)
        self.num_readers = max(1, num_workers)
        self.num_workers, self.rank, self.world_size, self.seed = num_workers, rank, world_size, seed
        self.pin_memory = pin_memory  # page-locked batches from workers (GPU runs)
        self.spec = {"sources": sets, "tokenizer": str(tokenizer), "seq_len": seq_len,
                     "micro_batch_size": micro_batch_size, "encoders": dict(encoders),
                     "rank": rank, "world_size": world_size, "num_readers": self.num_readers,
                     "seed": seed, "shuffle_buffer": shuffle_buffer, "strict": strict,
                     "max_image_pixels": max_image_pixels,
                     "loss_on_markers": loss_on_markers, "mixture": mixture,
                     "features": resolve_features([s.dir for s in sets], features)}
        self._states: list[dict[str, Any] | None] = [None] * self.num_readers
        self._next_worker = 0
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> MMLoader:
        return self

    def __next__(self) -> MMBatch:
        if self._it is None:
            self._it = self._start()
        item = next(self._it)
        self._states[item["worker"]] = item["state"]
        self._next_worker = (item["worker"] + 1) % self.num_readers
        return item["batch"]

    def _start(self) -> Iterator[dict[str, Any]]:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after use
        dataset = _MMDataset(self.spec, self._next_worker, list(self._states))
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=False, pin_memory=self.pin_memory))

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        self._it = None

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far, by reason, summed over this rank's workers."""
        total: dict[str, int] = {}
        for state in self._states:
            for reason, n in (state or {}).get("skipped", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    def _layout(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_readers": self.num_readers, "seed": self.seed,
                "sources": [[s.name, len(s.shards)] for s in self.spec["sources"]]}

    def state_dict(self) -> dict[str, Any]:
        return {**self._layout(), "next_worker": self._next_worker,
                "worker_states": [s for s in self._states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict` on the same rank, layout and sources."""
        for key, value in self._layout().items():
            saved = state.get(key)
            if saved != value:
                raise UserValueError(f"cannot resume the multimodal loader: it was saved with "
                                 f"{key}={saved!r} but this loader has {key}={value!r}")
        self.close()
        self._states = list(state["worker_states"])
        self._next_worker = int(state["next_worker"])


def resolve_features(shard_dirs: list[Path], features: dict[str, str] | None
                     ) -> dict[str, dict[str, Any]]:
    """{modality: {"fingerprint", "out_dim"}} of the modalities whose caches the loader reads
    (every shard set has a valid one); stale or partial caches raise FeatureCacheError."""
    resolved = {}
    for modality, fingerprint in (features or {}).items():
        index = check_caches(shard_dirs, modality, fingerprint)
        if index is not None:
            resolved[modality] = {"fingerprint": fingerprint, "out_dim": index["out_dim"]}
    return resolved


def _preprocessors(encoders: dict[str, Any], cached: dict[str, dict[str, Any]]
                   ) -> tuple[dict[str, Any], frozenset[str]]:
    """Each modality's preprocessor (cached ones serve features), and the cached modalities."""
    pre = {m: build_preprocessor(c) for m, c in encoders.items() if m not in cached}
    pre.update({m: CachedFeatures(m, c["fingerprint"], c["out_dim"]) for m, c in cached.items()})
    return pre, frozenset(cached)


def _check_vocab(tok, vocab_size: int | None, path) -> None:
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise UserValueError(f"tokenizer {path} has {tok.get_vocab_size()} tokens but "
                         f"model.vocab_size={vocab_size}; set model.vocab_size to at least "
                         f"{tok.get_vocab_size()}")


# ----------------------------------------------------------------------------- evaluation

def iter_mm_eval_batches(sources: list[tuple[str, str | Path]], tokenizer: str | Path,
                         seq_len: int, micro_batch_size: int, encoders: dict[str, Any],
                         max_batches: int | None = None, strict: bool = False,
                         loss_on_markers: bool = False,
                         max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                         features: dict[str, str] | None = None) -> Iterator[MMBatch]:
    """Validation batches, the same on every call: documents round-robin over the sources,
    each source's shards in index order and samples in stored order, packed like training;
    the last row is padded and the last batch may be short. Stops at `max_batches` or the
    end of the data. Each token's source is its shard set (`MMBatch.source_ids`, `sources`:
    the names in `sources`' order)."""
    cached = resolve_features([Path(d) for _, d in sources], features)
    pre, undecoded = _preprocessors(encoders, cached)
    docs = DocTokenizer(load_tokenizer(tokenizer), pre, seq_len + 1, loss_on_markers)
    policy = BadInputPolicy(strict)
    stream = _round_robin([_sequential_docs(ShardSet.open(n, d), docs, policy, max_image_pixels,
                                            undecoded, source=i)
                           for i, (n, d) in enumerate(sources)])
    names = tuple(n for n, _ in sources)
    packer = Packer(seq_len + 1, docs.pad_id, lambda: next(stream, None))
    emitted = 0
    while max_batches is None or emitted < max_batches:
        rows = [r for r in (packer.next_row() for _ in range(micro_batch_size)) if r is not None]
        if not rows:
            return
        yield collate_rows(rows, pre, names)
        emitted += 1


def _sequential_docs(src: ShardSet, docs: DocTokenizer, policy: BadInputPolicy,
                     max_image_pixels: int, undecoded: frozenset[str] = frozenset(),
                     source: int = -1) -> Iterator[TokenizedDoc]:
    stores = {m: FeatureStore(src.dir, m) for m in undecoded}
    for i, name in enumerate(src.shards):
        path = src.dir / name
        read = 0
        try:
            for raw in iter_raw_samples(path):
                read += 1
                try:
                    segments = fill_features(decode_document(raw, max_image_pixels, undecoded)[0],
                                             stores, name)
                    doc = docs(segments)
                    doc.source = source
                    yield doc
                except SampleError as err:
                    policy.sample(path, raw.key, err)
        except ShardError as err:
            policy.shard(path, err)
        policy.count(path, read, src.samples[i] if src.samples is not None else None)


def _round_robin(streams: list[Iterator[TokenizedDoc]]) -> Iterator[TokenizedDoc]:
    live = list(streams)
    while live:
        for stream in list(live):
            doc = next(stream, None)
            if doc is None:
                live.remove(stream)
            else:
                yield doc
