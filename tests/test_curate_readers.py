"""Recipe sources: Parquet, zstd/gzip JSONL, text and code trees, and bad input counted per
source (lenient) or one error naming file and line (strict). Texts are real licence files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mmfm.data.curation.recipe import Recipe, SourceSpec
from mmfm.data.curation.sources import SourceStats, iter_source

LICENSES = Path("/usr/share/common-licenses")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    files = sorted(p for p in LICENSES.iterdir() if p.is_file())[:6] if LICENSES.is_dir() else []
    if len(files) < 3:
        pytest.skip("no /usr/share/common-licenses on this machine")
    return [p.read_text(encoding="utf-8") for p in files]


def _recipe(tmp: Path, src: SourceSpec, strict: bool = False) -> Recipe:
    return Recipe(name="t", output=str(tmp / "out"), sources=[src], chains={"prose": ["pii"]},
                  strict=strict, base_dir=str(tmp))


def _read(tmp: Path, strict: bool = False, **spec) -> tuple[list[dict], SourceStats]:
    src = SourceSpec(name="s", **spec)
    stats = SourceStats()
    docs = list(iter_source(_recipe(tmp, src, strict), src, stats, tmp / "cache"))
    return docs, stats


def test_parquet_streams_rows_with_ids(tmp_path, texts):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"content": texts + [""], "doc_id": [f"lic{i}" for i in range(len(texts) + 1)]})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=2)
    docs, stats = _read(tmp_path, path="part-0.parquet", format="parquet",
                        text_field="content", id_field="doc_id")
    assert [d["text"] for d in docs] == texts
    assert docs[0]["id"] == "lic0" and docs[0]["source"] == "s"
    assert stats.skipped_empty == 1 and stats.docs == len(texts)
    with pytest.raises(ValueError, match=r"part-0.parquet: no column 'text'"):
        _read(tmp_path, strict=True, path="part-0.parquet", format="parquet")
    _, lenient = _read(tmp_path, path="part-0.parquet", format="parquet")
    assert lenient.skipped_unreadable == 1


def test_compressed_jsonl_zstd_and_gzip(tmp_path, texts):
    zstd = pytest.importorskip("zstandard")
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(lines.encode()))
    (tmp_path / "d" / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    docs, stats = _read(tmp_path, path="d", format="jsonl")
    assert len(docs) == 2 * len(texts) and stats.files == 2
    assert docs[0]["text"] == texts[0]


def test_bad_input_is_counted_per_kind_or_raises_naming_file_and_line(tmp_path, texts):
    d = tmp_path / "bad"
    d.mkdir()
    good = json.dumps({"text": texts[0]})
    (d / "a.jsonl").write_text(f"{good}\n{{not json\n{json.dumps({'txt': 'x'})}\n"
                               f"{json.dumps({'text': '   '})}\n{good}\n")
    (d / "b.jsonl").write_bytes(json.dumps({"text": "caf\xe9"}).encode("latin-1")[:-2]
                                + b'\xe9"}\n')
    (d / "c.jsonl.gz").write_bytes(b"this is not gzip data")
    docs, stats = _read(tmp_path, path="bad", format="jsonl")
    assert len(docs) == 2
    assert (stats.skipped_bad_lines, stats.skipped_empty, stats.skipped_non_utf8,
            stats.skipped_unreadable) == (2, 1, 1, 1)
    assert any("a.jsonl:2" in e for e in stats.skipped_examples)
    with pytest.raises(ValueError, match=r"a.jsonl:2: malformed JSON"):
        _read(tmp_path, strict=True, path="bad", format="jsonl")
    (d / "a.jsonl").write_text(good + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:1: not valid UTF-8"):
        _read(tmp_path, strict=True, path="bad", format="jsonl")
    (d / "b.jsonl").unlink()
    with pytest.raises(ValueError, match=r"c.jsonl.gz: cannot read: BadGzipFile"):
        _read(tmp_path, strict=True, path="bad", format="jsonl")


def test_text_and_code_trees_keep_paths(tmp_path, texts):
    t = tmp_path / "tree"
    (t / "pkg").mkdir(parents=True)
    (t / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (t / "notes.txt").write_text(texts[1])
    (t / "empty.txt").write_text("\n\n")
    (t / "latin1.txt").write_bytes("na\xefve".encode("latin-1"))
    code, _ = _read(tmp_path, path="tree", format="code", extensions=[".py"])
    assert code[0]["path"] == "pkg/mod.py" and code[0]["language"] == "python"
    assert code[0]["id"] == "s/pkg/mod.py"
    text, stats = _read(tmp_path, path="tree", format="text")
    assert [d["path"] for d in text] == ["notes.txt"]
    assert stats.skipped_empty == 1 and stats.skipped_non_utf8 == 1
    capped, _ = _read(tmp_path, path="tree", format="code", extensions=[".py", ".txt"],
                      max_docs=1)
    assert len(capped) == 1


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="data path does not exist: .*nowhere"):
        _read(tmp_path, path=str(tmp_path / "nowhere"), format="text")
