"""Streaming document readers: plain-text files, JSONL and source-code trees.

Every reader yields documents one at a time as plain dicts::

    {"text": str, "source": str, "id": str, ...metadata}

so curation stages (filters, dedup, tokenization) can be chained as iterators and the
corpus is never held in memory. Compressed files (``.gz``, ``.bz2``, and ``.zst`` when the
``zstandard`` package is installed) are decompressed transparently.

Bad input is handled in one of two modes:

* lenient (default): a non-UTF-8 file (or JSONL line), a malformed JSONL line, an empty
  document or an over-size file is skipped and counted in a :class:`ReadStats`;
* strict (``strict=True``): the same problems raise ``ValueError`` naming the file (and line).

A path that does not exist, or a directory holding no matching file, is always a
``ValueError`` naming the path: silently reading nothing would train on nothing.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mmfm.errors import UserValueError

Document = dict[str, Any]

TEXT_EXTENSIONS = (".txt", ".md", ".rst")
CODE_EXTENSIONS = {
    ".py": "python", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp",
    ".rs": "rust", ".go": "go", ".java": "java", ".js": "javascript", ".ts": "typescript",
    ".sh": "shell", ".rb": "ruby", ".lua": "lua",
}
# Directories that hold caches, VCS metadata or virtual environments, never source we want.
DEFAULT_EXCLUDE_DIRS = frozenset(
    {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules", ".tox",
     ".mypy_cache", ".pytest_cache", "site-packages"}
)
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")
_MAX_EXAMPLES = 20  # how many skipped file names a ReadStats keeps (counts are exact)


@dataclass
class ReadStats:
    """What a reader saw: exact counts plus a few example paths of what it skipped."""

    files: int = 0
    docs: int = 0
    chars: int = 0
    skipped_non_utf8: int = 0
    skipped_empty: int = 0
    skipped_too_large: int = 0
    skipped_bad_lines: int = 0  # malformed JSON, or a line without the text field
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return (self.skipped_non_utf8 + self.skipped_empty + self.skipped_too_large
                + self.skipped_bad_lines)

    def note_skip(self, kind: str, where: str) -> None:
        """Count one skipped item of `kind` (a field suffix, e.g. "non_utf8") at `where`."""
        name = f"skipped_{kind}"
        setattr(self, name, getattr(self, name) + 1)
        if len(self.skipped_examples) < _MAX_EXAMPLES:
            self.skipped_examples.append(f"{kind}: {where}")

    def note_doc(self, text: str) -> None:
        self.docs += 1
        self.chars += len(text)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["skipped"] = self.skipped
        return d


# ----------------------------------------------------------------------------- files

def strip_compression_suffix(name: str) -> str:
    """``"a.jsonl.gz"`` -> ``"a.jsonl"``; names without a compression suffix are unchanged."""
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_binary(path: str | Path) -> IO[bytes]:
    """Open `path` for binary reading, decompressing by its suffix."""
    p = str(path)
    if p.endswith(".gz"):
        return gzip.open(p, "rb")
    if p.endswith(".bz2"):
        return bz2.open(p, "rb")
    if p.endswith(".zst"):
        try:
            import zstandard  # optional: only needed for .zst inputs
        except ImportError as e:
            raise UserValueError(f"{p}: reading .zst files needs the 'zstandard' package") from e
        raw = open(p, "rb")
        # BufferedReader gives the line iteration that read_jsonl needs.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(p, "rb")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise UserValueError(f"data path does not exist: {path}")


def iter_files(
    paths: str | Path | Iterable[str | Path],
    extensions: Iterable[str] | None,
    exclude_dirs: Iterable[str] = DEFAULT_EXCLUDE_DIRS,
) -> Iterator[tuple[Path, Path]]:
    """Yield ``(file, root)`` for every file under `paths` whose name (less any compression
    suffix) ends with one of `extensions` (all files when None), in sorted order.

    A file given explicitly is always yielded. A file reached twice (through a symlink, or
    listed twice) is yielded once. Raises ValueError naming a missing path, or a path that
    holds no matching file.
    """
    exts = tuple(extensions) if extensions is not None else None
    excluded = frozenset(exclude_dirs)
    seen: set[str] = set()
    for root in _as_path_list(paths):
        _check_exists(root)
        found = 0
        for f in _walk_sorted(root, excluded) if root.is_dir() else [root]:
            if root.is_dir() and exts is not None:
                if not strip_compression_suffix(f.name).endswith(exts):
                    continue
            found += 1
            real = os.path.realpath(f)
            if real in seen:
                continue
            seen.add(real)
            yield f, root if root.is_dir() else root.parent
        if found == 0:
            what = f" matching {', '.join(exts)}" if exts else ""
            raise UserValueError(f"data path holds no files{what}: {root}")


def _as_path_list(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = [Path(p) for p in paths]
    if not out:
        raise UserValueError("no data paths given")
    return out


def _walk_sorted(root: Path, excluded: frozenset[str]) -> Iterator[Path]:
    # os.walk with sorted names, so document order (and everything derived from it,
    # like shard contents) is the same on every machine and every run.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in excluded)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():  # skips broken symlinks, sockets, fifos
                yield p


def decode_utf8(data: bytes, where: str, stats: ReadStats, strict: bool) -> str | None:
    """Decode UTF-8 (dropping a BOM); on failure count+skip (None) or raise in strict mode."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if strict:
            raise UserValueError(f"{where}: not valid UTF-8 (byte {e.start}): {e.reason}") from e
        stats.note_skip("non_utf8", where)
        return None


def read_file_text(
    path: Path, stats: ReadStats, strict: bool = False, max_bytes: int | None = None
) -> str | None:
    """The whole (decompressed) text of one file, or None if it was skipped and counted."""
    if max_bytes is not None and path.stat().st_size > max_bytes:
        if strict:
            raise UserValueError(f"{path}: {path.stat().st_size} bytes exceeds max_bytes={max_bytes}")
        stats.note_skip("too_large", str(path))
        return None
    with open_binary(path) as fh:
        data = fh.read()
    return decode_utf8(data, str(path), stats, strict)


def _keep_text(text: str | None, where: str, stats: ReadStats) -> bool:
    """True if `text` is a usable document; empty ones are counted (never an error)."""
    if text is None:
        return False
    if not text.strip():
        stats.note_skip("empty", where)
        return False
    return True


# ----------------------------------------------------------------------------- readers

def read_text_files(
    paths: str | Path | Iterable[str | Path],
    *,
    source: str | None = None,
    extensions: Iterable[str] | None = TEXT_EXTENSIONS,
    stats: ReadStats | None = None,
    strict: bool = False,
    max_bytes: int | None = None,
    exclude_dirs: Iterable[str] = DEFAULT_EXCLUDE_DIRS,
    relative_to: str | Path | None = None,
) -> Iterator[Document]:
    """One document per text file under `paths` (files or directories, walked recursively).

    `source` defaults to the first path's name; the document id is
    ``"{source}/{path}"`` where ``path`` is relative to `relative_to` if given, else to the
    directory being walked (a file given directly: its name), so ids are the same on every
    machine.
    """
    stats = stats if stats is not None else ReadStats()
    roots = _as_path_list(paths)
    source = source or roots[0].name
    for f, root in iter_files(roots, extensions, exclude_dirs):
        stats.files += 1
        text = read_file_text(f, stats, strict, max_bytes)
        if not _keep_text(text, str(f), stats):
            continue
        rel = f.relative_to(relative_to or root).as_posix()
        stats.note_doc(text)
        yield {"text": text, "source": source, "id": f"{source}/{rel}", "path": rel}


def read_code_tree(
    paths: str | Path | Iterable[str | Path],
    *,
    source: str | None = None,
    extensions: Iterable[str] = (".py",),
    stats: ReadStats | None = None,
    strict: bool = False,
    max_bytes: int | None = None,
    exclude_dirs: Iterable[str] = DEFAULT_EXCLUDE_DIRS,
    relative_to: str | Path | None = None,
) -> Iterator[Document]:
    """One document per source file; keeps the relative `path` and a `language` guess."""
    for doc in read_text_files(paths, source=source, extensions=extensions, stats=stats,
                               strict=strict, max_bytes=max_bytes, exclude_dirs=exclude_dirs,
                               relative_to=relative_to):
        suffix = Path(strip_compression_suffix(doc["path"])).suffix
        doc["language"] = CODE_EXTENSIONS.get(suffix, suffix.lstrip(".") or "unknown")
        yield doc


def read_jsonl(
    paths: str | Path | Iterable[str | Path],
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    source: str | None = None,
    stats: ReadStats | None = None,
    strict: bool = False,
    extensions: Iterable[str] = (".jsonl", ".json"),
) -> Iterator[Document]:
    """One document per JSON line. Other fields of the record are kept as metadata.

    The document's `source` is, in order: the record's own "source" field, `source`, the
    file's name. Its id is the record's `id_field` value, else ``"{file}:{line}"``.
    A malformed line, a line that is not UTF-8, or one whose `text_field` is missing or not
    a string is skipped and counted (or raises naming file and line when `strict`).
    """
    stats = stats if stats is not None else ReadStats()
    for f, _root in iter_files(paths, extensions):
        stats.files += 1
        with open_binary(f) as fh:
            for lineno, raw in enumerate(fh, start=1):
                doc = _parse_jsonl_line(raw, f, lineno, text_field, id_field, source, stats,
                                        strict)
                if doc is not None:
                    stats.note_doc(doc["text"])
                    yield doc


def _parse_jsonl_line(
    raw: bytes, f: Path, lineno: int, text_field: str, id_field: str | None,
    source: str | None, stats: ReadStats, strict: bool,
) -> Document | None:
    where = f"{f}:{lineno}"
    if not raw.strip():
        return None  # blank lines (e.g. a trailing newline) are not documents
    line = decode_utf8(raw, where, stats, strict)
    if line is None:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return _bad_line(where, f"malformed JSON ({e.msg})", stats, strict)
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        return _bad_line(where, f"no string field {text_field!r}", stats, strict)
    text = record.pop(text_field)
    if not _keep_text(text, where, stats):
        return None
    doc_id = record.pop(id_field, None) if id_field else None
    doc: Document = {"text": text, "source": record.pop("source", None) or source or f.name,
                     "id": str(doc_id) if doc_id is not None else f"{f.name}:{lineno}"}
    doc.update(record)
    return doc


def _bad_line(where: str, why: str, stats: ReadStats, strict: bool) -> None:
    if strict:
        raise UserValueError(f"{where}: {why}")
    stats.note_skip("bad_lines", where)
    return None


def read_documents(
    path: str | Path, *, fmt: str = "auto", **kwargs: Any
) -> Iterator[Document]:
    """Dispatch on `fmt` ("text", "jsonl", "code", or "auto": JSONL for ``*.jsonl[.gz]``
    files and directories of them, plain text otherwise)."""
    readers = {"text": read_text_files, "jsonl": read_jsonl, "code": read_code_tree}
    if fmt == "auto":
        fmt = "jsonl" if _looks_like_jsonl(Path(path)) else "text"
    if fmt not in readers:
        raise UserValueError(f"unknown document format {fmt!r}; expected one of {sorted(readers)}")
    return readers[fmt](path, **kwargs)


def _looks_like_jsonl(path: Path) -> bool:
    _check_exists(path)
    if path.is_file():
        return strip_compression_suffix(path.name).endswith(".jsonl")
    return any(strip_compression_suffix(p.name).endswith(".jsonl") for p in path.iterdir())
