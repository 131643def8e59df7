"""Token shards: standard WebDataset tar files, one sample per document, plus index.json.

Layout of ``out_dir``::

    shard-000000.tar        members: KEY.ids.npy  (int32 token ids, the document's text
    shard-000001.tar                              followed by one <|endoftext|>)
    ...                              KEY.json     ({"id", "source", "n_tokens", ...metadata})
    index.json              shard names with sample/token counts, tokenizer vocab size and
                            fingerprint, special token ids, per-source counts

The tars are plain WebDataset: ``webdataset.WebDataset(urls).decode()`` yields dicts with
an ``"ids.npy"`` numpy array and a ``"json"`` dict, and ``tar tf`` lists them; nothing here
needs mmfm to be read back. Each shard is written to a temp name and renamed when complete,
and index.json is written last, so a crash never leaves a directory that looks finished.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mmfm.data.readers import Document
from mmfm.data.tar_scan import ShardError, iter_tar_files, unsafe_member
from mmfm.data.tokenizer import (
    EOS,
    PAD,
    encode_plain,
    load_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
)
from mmfm.errors import UserValueError

INDEX_NAME = "index.json"
INDEX_FORMAT = "mmfm-token-shards"
INDEX_VERSION = 1
TOKENS_EXT = "ids.npy"
META_EXT = "json"
_ENCODE_BATCH = 256  # documents per encode_batch call: enough to keep the Rust side busy


def validate_key(key: str) -> str:
    """A WebDataset key must be a plain name: no path separator (tar members would land in
    other directories), no ".." (path traversal on extraction) and no "." at all, because
    WebDataset splits key from extension at the first dot of the member name."""
    if not key or "/" in key or "\\" in key or ".." in key or "." in key:
        raise UserValueError(f"invalid shard key {key!r}: keys may not be empty or contain "
                         "'/', '\\', '..' or '.'")
    return key


def write_token_shards(
    docs: Iterable[Document],
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    docs_per_shard: int = 1000,
    prefix: str = "shard",
) -> dict[str, Any]:
    """Tokenize `docs` (streamed) and write them as WebDataset shards; return the index.

    Each document's ids are its text's tokens followed by ``<|endoftext|>``. A document may
    carry its own "key" (validated by :func:`validate_key`); otherwise keys are
    ``{prefix}{running number}``. Empty documents are skipped (counted in the index).
    """
    if docs_per_shard <= 0:
        raise UserValueError(f"docs_per_shard={docs_per_shard} must be > 0")
    validate_key(prefix)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    specials = special_token_ids(tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_NAME
    if index_path.exists():
        index_path.unlink()  # stale index must not describe the shards we are replacing
    writer = _ShardSequence(out, prefix, docs_per_shard)
    sources: dict[str, dict[str, int]] = {}
    skipped_empty = 0
    for number, (doc, ids) in enumerate(_tokenized(docs, tok, specials[EOS])):
        if len(ids) == 1:  # only the EOS: nothing to learn from
            skipped_empty += 1
            continue
        key = validate_key(str(doc["key"])) if "key" in doc else f"{prefix}{number:09d}"
        meta = {k: v for k, v in doc.items() if k not in ("text", "key")}
        meta["n_tokens"] = len(ids)
        writer.write(key, ids, meta)
        per = sources.setdefault(str(doc.get("source", "unknown")), {"docs": 0, "tokens": 0})
        per["docs"] += 1
        per["tokens"] += len(ids)
    shards = writer.close()
    if not shards:
        raise UserValueError(f"no non-empty documents to write into {out}")
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "shards": shards,
        "num_samples": sum(s["samples"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        "skipped_empty": skipped_empty,
        "dtype": "int32",
        "tokens_member": TOKENS_EXT,
        "meta_member": META_EXT,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_sha256": tokenizer_fingerprint(tok),
        "eos_id": specials[EOS],
        "pad_id": specials[PAD],
        "special_tokens": specials,
        "sources": sources,
    }
    _write_json_atomic(index_path, index)
    return index


def _tokenized(
    docs: Iterable[Document], tok: Tokenizer, eos: int
) -> Iterator[tuple[Document, np.ndarray]]:
    """(doc, int32 ids with EOS appended), encoding in batches but never the whole stream."""
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _ENCODE_BATCH:
            yield from _encode_batch(batch, tok, eos)
            batch = []
    if batch:
        yield from _encode_batch(batch, tok, eos)


def _encode_batch(
    batch: list[Document], tok: Tokenizer, eos: int
) -> Iterator[tuple[Document, np.ndarray]]:
    for doc, ids in zip(batch, encode_plain(tok, [d["text"] for d in batch]), strict=True):
        arr = np.empty(len(ids) + 1, dtype=np.int32)
        arr[:-1] = ids
        arr[-1] = eos
        yield doc, arr


class _ShardSequence:
    """Writes numbered tar shards of at most `per_shard` samples, each via temp + rename."""

    def __init__(self, out: Path, prefix: str, per_shard: int) -> None:
        self.out, self.prefix, self.per_shard = out, prefix, per_shard
        self.shards: list[dict[str, Any]] = []
        self._tar: Any = None  # webdataset.TarWriter while a shard is open
        self._tmp: Path | None = None
        self._samples = 0
        self._tokens = 0

    def write(self, key: str, ids: np.ndarray, meta: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        # TarWriter's default encoders turn ".npy" into np.save bytes and ".json" into JSON.
        self._tar.write({"__key__": key, TOKENS_EXT: ids, META_EXT: meta})
        self._samples += 1
        self._tokens += int(ids.size)
        if self._samples == self.per_shard:
            self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f".{name}.tmp"
        # Imported here: only writing needs webdataset, and readers of mmfm.data (the trainer,
        # bench/gpu_check.py on a bare GPU box) should not depend on it.
        import webdataset as wds

        self._tar = wds.TarWriter(str(self._tmp))
        self._samples = self._tokens = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        name = self._tmp.name[1:-len(".tmp")]
        os.replace(self._tmp, self.out / name)
        self.shards.append({"name": name, "samples": self._samples, "tokens": self._tokens})
        self._tar = None


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON beside `path`, then rename: readers never see a half-written index."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_index_json(path: Path, fmt: str, kind: str) -> dict[str, Any]:
    """Parse a shard index and check its format tag (ValueError naming the file); shared by the
    token and multimodal shard readers, which add their own existence checks and hints."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserValueError(f"unreadable shard index {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != fmt or not index.get("shards"):
        raise UserValueError(f"{path} is not an mmfm {kind} shard index, or lists no shards")
    for i, shard in enumerate(index["shards"]):
        _check_index_entry(shard, i, path)
    return index


def _check_index_entry(shard: Any, i: int, path: Path) -> None:
    """A listed shard is a plain file name in the index's own folder, with a sample count:
    an index naming `../other/shard.tar` or `/data/val/shard.tar` would read another split."""
    name = shard.get("name") if isinstance(shard, dict) else None
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name \
            or "\\" in name:
        raise UserValueError(f"{path}: shards[{i}].name={name!r} must be a file name inside "
                             f"{path.parent} (no folder, no '..')")
    samples = shard.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise UserValueError(f"{path}: shards[{i}].samples={samples!r} must be an integer >= 0")


def check_disjoint_splits(train_dir: str | Path, val_dir: str | Path, what: str = "data") -> None:
    """Refuse a train index whose shard files are also the validation shards (the same folder,
    or the same files reached through links): validation loss would measure memorization."""
    def files(d: str | Path) -> dict[Path, str]:
        index = json.loads((Path(d) / INDEX_NAME).read_text(encoding="utf-8"))
        return {(Path(d) / s["name"]).resolve(): s["name"] for s in index["shards"]}

    train, val = files(train_dir), files(val_dir)
    shared = sorted(train[p] for p in train.keys() & val.keys())
    if shared:
        raise UserValueError(f"{what}: the train index in {train_dir} names validation shards "
                             f"of {val_dir} ({', '.join(shared[:3])}); train and validation "
                             "must be different files")


def read_index(shards_dir: str | Path) -> dict[str, Any]:
    """Load and check ``shards_dir/index.json``; ValueError naming the directory if the
    directory is missing, holds no shards, or its index is unreadable or incomplete."""
    d = Path(shards_dir)
    if not d.is_dir():
        raise UserValueError(f"shard directory does not exist: {d}")
    path = d / INDEX_NAME
    if not path.is_file():
        hint = " (it holds .tar files but no index.json: was writing interrupted?)" if any(
            d.glob("*.tar")) else ""
        raise UserValueError(f"no token shards in {d}: {INDEX_NAME} is missing{hint}; write "
                         "shards with `mmfm data shards`")
    index = load_index_json(path, INDEX_FORMAT, "token")
    missing = [s["name"] for s in index["shards"] if not (d / s["name"]).is_file()]
    if missing:
        raise UserValueError(f"shard index {path} lists missing shard files: {missing[:5]}")
    return index


def iter_shard_docs(path: str | Path) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """``(key, int32 ids, metadata)`` for each sample of one shard, in stored order.

    Reads the tar directly (members of one sample are adjacent), which is all the loader
    needs and keeps its position exact; any WebDataset reader sees the same samples. A damaged,
    truncated or non-tar file, or a member named with ``..`` or an absolute path, raises
    ShardError naming the shard (and byte) after the samples before it.
    """
    pending: dict[str, Any] = {}
    current: str | None = None
    try:
        for name, data in iter_tar_files(path):
            if unsafe_member(name):
                raise ShardError(f"shard {path}: member {name!r} has an absolute path or '..'")
            key, _, ext = name.rpartition("/")[2].partition(".")
            if key != current and current is not None:
                yield _sample(current, pending, path)
                pending = {}
            current = key
            pending[ext] = _decode_member(ext, data, path, key)
    except ShardError:
        if current is not None and TOKENS_EXT in pending:  # complete before the damage
            yield _sample(current, pending, path)
        raise
    if current is not None:
        yield _sample(current, pending, path)


def _decode_member(ext: str, data: bytes, path: str | Path, key: str) -> Any:
    try:
        return np.load(io.BytesIO(data)) if ext == TOKENS_EXT else json.loads(data)
    except (ValueError, OSError, EOFError):  # np.load / json: garbage member bytes
        raise ShardError(f"shard {path}: sample {key!r} member {ext} is not valid "
                         f"{'npy' if ext == TOKENS_EXT else 'JSON'}") from None


def _sample(
    key: str, parts: dict[str, Any], path: str | Path
) -> tuple[str, np.ndarray, dict[str, Any]]:
    if TOKENS_EXT not in parts:
        raise ShardError(f"shard {path}: sample {key!r} has no {TOKENS_EXT} member")
    return key, parts[TOKENS_EXT].astype(np.int32, copy=False), parts.get(META_EXT, {})
