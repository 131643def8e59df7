"""Readers: plain text, JSONL and code trees; compression; bad input (lenient and strict)."""

from __future__ import annotations

import bz2
import gzip
import json
import os
from pathlib import Path

import pytest

from mmfm.data.readers import (
    ReadStats,
    read_code_tree,
    read_documents,
    read_jsonl,
    read_text_files,
)

LATIN1 = "Résumé naïve café".encode("latin-1")  # invalid as UTF-8


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("first document\n", encoding="utf-8")
    (root / "sub" / "b.txt").write_text("second — with non-ASCII ✓\n", encoding="utf-8")
    with gzip.open(root / "c.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("gzipped document")
    with bz2.open(root / "d.txt.bz2", "wt", encoding="utf-8") as fh:
        fh.write("bz2 document")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def test_text_files_recursive_sorted_with_compression(tmp_path):
    root = _tree(tmp_path)
    stats = ReadStats()
    docs = list(read_text_files(root, source="t", stats=stats))
    assert [d["id"] for d in docs] == ["t/a.txt", "t/c.txt.gz", "t/d.txt.bz2", "t/sub/b.txt"]
    assert [d["text"] for d in docs][1:3] == ["gzipped document", "bz2 document"]
    assert docs[3]["text"] == "second — with non-ASCII ✓\n"
    assert all(d["source"] == "t" for d in docs)
    assert (stats.files, stats.docs, stats.skipped) == (4, 4, 0)
    assert stats.chars == sum(len(d["text"]) for d in docs)


def test_non_utf8_file_skipped_and_counted(tmp_path):
    root = _tree(tmp_path)
    (root / "latin1.txt").write_bytes(LATIN1)
    stats = ReadStats()
    docs = list(read_text_files(root, stats=stats))
    assert len(docs) == 4 and "latin1" not in " ".join(d["id"] for d in docs)
    assert stats.skipped_non_utf8 == 1
    assert any("latin1.txt" in e for e in stats.skipped_examples)


def test_non_utf8_strict_names_the_file(tmp_path):
    root = _tree(tmp_path)
    (root / "latin1.txt").write_bytes(LATIN1)
    with pytest.raises(ValueError, match=r"latin1\.txt.*not valid UTF-8"):
        list(read_text_files(root, strict=True))


def test_bom_dropped_empty_skipped_and_symlink_read_once(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    (root / "bom.txt").write_bytes("\ufeffhello".encode())
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    os.symlink(root / "bom.txt", root / "link.txt")
    stats = ReadStats()
    docs = list(read_text_files(root, stats=stats))
    assert [d["text"] for d in docs] == ["hello"]
    assert stats.skipped_empty == 1


def test_missing_and_empty_paths_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=f"does not exist: {tmp_path / 'nope'}"):
        list(read_text_files(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"holds no files.*{tmp_path / 'empty'}"):
        list(read_text_files(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no data paths"):
        list(read_text_files([]))


def test_jsonl_text_field_metadata_and_bad_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"body": "one", "id": 7, "lang": "en"}),
        "{not json",
        json.dumps({"other": "no body"}),
        "",
        json.dumps({"body": "two", "source": "web"}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + LATIN1 + b"\n")
    stats = ReadStats()
    docs = list(read_jsonl(path, text_field="body", source="s", stats=stats))
    assert docs == [
        {"text": "one", "source": "s", "id": "7", "lang": "en"},
        {"text": "two", "source": "web", "id": "docs.jsonl:5"},
    ]
    assert (stats.skipped_bad_lines, stats.skipped_non_utf8) == (2, 1)
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: malformed JSON"):
        list(read_jsonl(path, text_field="body", strict=True))


def test_jsonl_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "zipped"}) + "\n")
    assert [d["text"] for d in read_documents(path)] == ["zipped"]


def test_code_tree_keeps_path_and_language(tmp_path):
    root = tmp_path / "proj"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\n", encoding="utf-8")
    (root / "pkg" / "__pycache__" / "mod.py").write_text("cached\n", encoding="utf-8")
    (root / "lib.rs").write_text("fn main() {}\n", encoding="utf-8")
    (root / "README.md").write_text("readme\n", encoding="utf-8")
    docs = list(read_code_tree(root, source="code", extensions=(".py", ".rs")))
    assert [(d["path"], d["language"]) for d in docs] == [("lib.rs", "rust"),
                                                         ("pkg/mod.py", "python")]
    assert docs[1]["id"] == "code/pkg/mod.py"
