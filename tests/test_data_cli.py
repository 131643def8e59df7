"""`mmfm data ...` commands: help text, the corpus -> tokenizer -> shards flow, one-line errors."""

from __future__ import annotations

import argparse

import pytest

from mmfm.data.cli import register
from mmfm.data.corpus import build_corpus, stdlib_source
from mmfm.data.loader import TokenLoader
from mmfm.data.shards import read_index


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize("step", ["corpus", "tokenizer", "shards"])
def test_help_explains_each_step(step, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["data", step, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and len(out.splitlines()) > 8


def test_tokenizer_then_shards_from_a_corpus_dir(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    build_corpus([stdlib_source(max_bytes=300_000)], corpus, holdout_fraction=0.1)
    assert _run("data", "tokenizer", "--corpus", str(corpus), "--out",
                str(tmp_path / "tok.json"), "--vocab-size", "512") == 0
    assert _run("data", "shards", "--corpus", str(corpus), "--tokenizer",
                str(tmp_path / "tok.json"), "--out", str(tmp_path / "shards"),
                "--docs-per-shard", "5") == 0
    out = capsys.readouterr().out
    assert "tokenizer with 512 tokens" in out and "train:" in out and "val:" in out
    train, val = read_index(tmp_path / "shards" / "train"), read_index(tmp_path / "shards" / "val")
    assert train["vocab_size"] == val["vocab_size"] == 512
    assert train["tokenizer_sha256"] == val["tokenizer_sha256"]
    assert len(train["shards"]) > 1
    next(TokenLoader(tmp_path / "shards" / "train", 32, 2, vocab_size=512))


def test_user_errors_are_one_line_through_the_main_cli(tmp_path, capsys):
    from mmfm.cli import main

    code = main(["data", "tokenizer", "--corpus", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: corpus path does not exist: {tmp_path / 'missing'}"
    code = main(["data", "shards", "--corpus", str(tmp_path), "--tokenizer",
                 str(tmp_path / "t.json"), "--out", str(tmp_path / "o")])
    assert code == 2 and "tokenizer file not found" in capsys.readouterr().err
