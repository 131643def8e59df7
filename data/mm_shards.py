"""Interleaved multimodal shards: standard WebDataset tars, one sample per document.

A sample with key KEY is the tar members::

    KEY.json     {"segments": [{"text": "..."}, {"image": "0.png"}, {"audio": "1.flac"}, ...],
                  "source": "...", "license": "...", "language": "en", ...}
    KEY.0.png    media members, named KEY.<n>.<ext>, n counting media items in document
    KEY.1.flac   order; the json's segments reference them by "<n>.<ext>"

Shards are ``{name}-{000000..}.tar`` in ``out_dir`` (name, digits and the maximum samples
and bytes per shard are arguments), each written to a temp name and renamed when complete;
``index.json`` is written last with per-shard sample/media counts and the brace pattern
that plain ``webdataset.WebDataset(pattern)`` accepts. Nothing here is needed to read the
shards: ``tar tf`` lists them and WebDataset yields ``{"json", "0.png", "1.flac", ...}``.
See docs/multimodal.md.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmfm.data.shards import _write_json_atomic, load_index_json, validate_key
from mmfm.data.tar_scan import ShardError as ShardError  # re-exported for the readers
from mmfm.data.tar_scan import iter_tar_files, unsafe_member
from mmfm.encoders.media import (
    AUDIO_EXTS,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTS,
    MediaError,
    MediaTooLarge,
    Waveform,
    decode_audio,
    decode_image,
    encode_flac,
    encode_png,
    media_kind,
)
from mmfm.errors import UserValueError

INDEX_NAME = "index.json"
INDEX_FORMAT = "mmfm-mm-shards"
INDEX_VERSION = 1
META_FIELDS = ("source", "license", "language", "origin")


class SampleError(UserValueError):
    """One sample that cannot become a document; `reason` is a short category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class RawSample:
    """A sample's members as stored: {extension: bytes}, e.g. {"json": ..., "0.png": ...}."""

    key: str
    members: dict[str, bytes]
    unsafe: list[str] = field(default_factory=list)  # member names with '..' or absolute paths


# ----------------------------------------------------------------------------- writing

def write_mm_shards(docs: Iterable[dict[str, Any]], out_dir: str | Path, *, name: str = "mm",
                    max_samples: int = 100, max_bytes: int | None = None,
                    digits: int = 6) -> dict[str, Any]:
    """Write documents as WebDataset shards and index.json; return the index.

    A document is ``{"segments": [...], "key": optional, "source"/"license"/... metadata}``
    with segments ``{"text": str}``, ``{"image": PIL image | array | encoded bytes}`` or
    ``{"audio": Waveform | encoded bytes}`` (encoded bytes need ``"format": "png"`` etc.).
    Arrays and images are stored as PNG, waveforms as FLAC. Documents with no content are
    skipped and counted; a key with a path separator, ".." or "." is rejected.
    """
    if max_samples <= 0 or (max_bytes is not None and max_bytes <= 0):
        raise UserValueError(f"max_samples={max_samples} and max_bytes={max_bytes} must be > 0")
    validate_key(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # a stale index must not describe new shards
    writer = _Rotating(out, name, digits, max_samples, max_bytes)
    sources: dict[str, dict[str, int]] = {}
    skipped_empty = 0
    for number, doc in enumerate(docs):
        key = validate_key(str(doc["key"])) if doc.get("key") is not None else f"{name}{number:09d}"
        members, counts = encode_document(doc)
        if counts["images"] + counts["audio"] == 0 and counts["text_chars"] == 0:
            skipped_empty += 1
            continue
        writer.write(key, members, counts)
        per = sources.setdefault(str(doc.get("source", "unknown")), dict.fromkeys(counts, 0))
        for k, v in counts.items():
            per[k] += v
    shards = writer.close()
    if not shards:
        raise UserValueError(f"no non-empty documents to write into {out}")
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shards": shards,
             "pattern": _brace_pattern(name, digits, len(shards)),
             "num_samples": sum(s["samples"] for s in shards),
             "skipped_empty": skipped_empty, "sources": sources}
    _write_json_atomic(out / INDEX_NAME, index)
    return index


def encode_document(doc: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, int]]:
    """({extension: bytes} members, counts) of one document; ValueError on a bad segment."""
    segments, members = [], {}
    counts = {"docs": 1, "images": 0, "audio": 0, "text_chars": 0}
    for i, seg in enumerate(doc.get("segments") or []):
        if "text" in seg:
            if seg["text"]:
                segments.append({"text": str(seg["text"])})
                counts["text_chars"] += len(seg["text"])
            continue
        kind = "image" if "image" in seg else "audio" if "audio" in seg else None
        if kind is None:
            raise UserValueError(f"segment {i} of document {doc.get('key')!r} has none of "
                             "text, image, audio")
        ext, data = _encode_media(kind, seg[kind], seg.get("format"))
        member = f"{counts['images'] + counts['audio']}.{ext}"
        members[member] = data
        segments.append({kind: member})
        counts["images" if kind == "image" else "audio"] += 1
    meta = {k: doc[k] for k in doc if k not in ("segments", "key")}
    members = {"json": json.dumps({"segments": segments, **meta}, ensure_ascii=False).encode(),
               **members}
    return members, counts


def _encode_media(kind: str, value: Any, fmt: str | None) -> tuple[str, bytes]:
    if isinstance(value, (bytes, bytearray)):
        allowed = IMAGE_EXTS if kind == "image" else AUDIO_EXTS
        if fmt not in allowed:
            raise UserValueError(f"{kind} bytes need a format in {allowed}, got {fmt!r}")
        return fmt, bytes(value)
    if kind == "image" and isinstance(value, (Image.Image, np.ndarray)):
        return "png", encode_png(value)
    if kind == "audio" and isinstance(value, Waveform):
        return "flac", encode_flac(value)
    raise UserValueError(f"cannot store a {type(value).__name__} as {kind}")


class _Rotating:
    """Numbered tar shards, a new one when the sample or byte limit would be exceeded."""

    def __init__(self, out: Path, name: str, digits: int, max_samples: int,
                 max_bytes: int | None) -> None:
        self.out, self.name, self.digits = out, name, digits
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._stats: dict[str, Any] = {}

    def write(self, key: str, members: dict[str, bytes], counts: dict[str, int]) -> None:
        size = sum(len(v) + 1024 for v in members.values())  # 512-byte header + padding
        if self._tar is not None and (self._stats["samples"] >= self.max_samples or (
                self.max_bytes and self._stats["bytes"] + size > self.max_bytes)):
            self._finish()
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._stats["samples"] += 1
        self._stats["bytes"] += size
        for k in ("images", "audio"):
            self._stats[k] += counts[k]

    def _open(self) -> None:
        shard = f"{self.name}-{len(self.shards):0{self.digits}d}.tar"
        self._tmp = self.out / f".{shard}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._stats = {"name": shard, "samples": 0, "bytes": 0, "images": 0, "audio": 0}

    def _finish(self) -> None:
        self._tar.close()
        os.replace(self._tmp, self.out / self._stats["name"])
        self._stats["bytes"] = (self.out / self._stats["name"]).stat().st_size
        self.shards.append(self._stats)
        self._tar = None

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._finish()
        return self.shards


def _brace_pattern(name: str, digits: int, count: int) -> str:
    return f"{name}-{{{0:0{digits}d}..{count - 1:0{digits}d}}}.tar"


# ----------------------------------------------------------------------------- reading

def read_mm_index(shards_dir: str | Path) -> dict[str, Any]:
    """Load and check ``shards_dir/index.json`` (ValueError naming the directory)."""
    d = Path(shards_dir)
    path = d / INDEX_NAME
    if not path.is_file():
        raise UserValueError(f"no multimodal shards in {d}: {INDEX_NAME} is missing; write them "
                         "with `mmfm data shards --multimodal RECIPE.yaml`")
    return load_index_json(path, INDEX_FORMAT, "multimodal")


def iter_raw_samples(path: str | Path) -> Iterator[RawSample]:
    """Samples of one shard in stored order (members of a sample are adjacent in the tar).
    Raises ShardError if the file is missing, not a tar, truncated, or damaged mid-way (the
    complete samples before the damaged one are yielded first). Members named with '..' or an absolute path
    are never used: they are listed in `RawSample.unsafe`, which refuses the sample."""
    current: RawSample | None = None
    # On damage the sample being read is dropped: its media may be what was cut. The index
    # comparison of the readers counts it.
    for name, data in iter_tar_files(path):
        key, _, ext = name.replace("\\", "/").rpartition("/")[2].partition(".")
        if current is not None and key != current.key:
            yield current
            current = None
        current = current or RawSample(key, {})
        if unsafe_member(name):
            current.unsafe.append(name)
        else:
            current.members[ext] = data
    if current is not None:
        yield current


@dataclass(frozen=True)
class MemberRef:
    """A media segment left undecoded: the member name (`0.png`) within its sample."""

    key: str
    member: str


def decode_document(raw: RawSample, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                    undecoded: frozenset[str] = frozenset()
                    ) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """([(kind, value)] segments with media decoded, metadata) of one raw sample. Media of a
    kind in `undecoded` (served from a feature cache) come back as a :class:`MemberRef`.

    Raises SampleError with reason bad_json, missing_member, unsupported_media,
    corrupt_image, corrupt_audio, image_too_large, unsafe_member or empty_document.
    """
    if raw.unsafe:
        raise SampleError("unsafe_member", f"member {raw.unsafe[0]!r} has an absolute path or "
                                           "'..'; the sample is refused")
    meta = _parse_json(raw)
    segments: list[tuple[str, Any]] = []
    for i, seg in enumerate(meta.get("segments") or []):
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            if seg["text"]:
                segments.append(("text", seg["text"]))
            continue
        segments.append(_decode_segment(raw, i, seg, max_image_pixels, undecoded))
    if not segments:
        raise SampleError("empty_document", "the document has no text or media segments")
    return segments, {k: v for k, v in meta.items() if k != "segments"}


def _parse_json(raw: RawSample) -> dict[str, Any]:
    if "json" not in raw.members:
        raise SampleError("missing_member", "the sample has no json member")
    try:
        meta = json.loads(raw.members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError("bad_json", str(err)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("segments", []), list):
        raise SampleError("bad_json", "json must be an object with a list of segments")
    return meta


def _decode_segment(raw: RawSample, i: int, seg: Any, max_pixels: int,
                    undecoded: frozenset[str] = frozenset()) -> tuple[str, Any]:
    kind = next((k for k in ("image", "audio") if isinstance(seg, dict) and k in seg), None)
    if kind is None:
        raise SampleError("unsupported_media", f"segment {i} ({str(seg)[:60]}) is not text, "
                                               "image or audio")
    member = str(seg[kind])
    if media_kind(member) != kind:
        raise SampleError("unsupported_media", f"segment {i}: {kind} member {member!r} has an "
                                               "unsupported extension")
    if member not in raw.members:
        raise SampleError("missing_member", f"segment {i} references {raw.key}.{member}, "
                                            "which the sample does not hold")
    if kind in undecoded:
        return kind, MemberRef(raw.key, member)
    try:
        data = raw.members[member]
        value = decode_image(data, max_pixels) if kind == "image" else decode_audio(data)
    except MediaTooLarge as err:
        raise SampleError("image_too_large", f"{raw.key}.{member}: {err}") from None
    except MediaError as err:
        raise SampleError(f"corrupt_{kind}", f"{raw.key}.{member}: {err}") from None
    return kind, value
