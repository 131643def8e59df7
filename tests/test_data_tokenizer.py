"""Byte-level BPE tokenizer: round trip, special tokens, load errors."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from mmfm.data.readers import read_code_tree
from mmfm.data.tokenizer import (
    EOS,
    SPECIAL_TOKENS,
    encode_plain,
    load_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
    train_tokenizer,
)

STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [d["text"] for d in read_code_tree(STDLIB_JSON)]
    tok = train_tokenizer(iter(texts), vocab_size=400, out_path=path)
    return tok, path, texts


def test_round_trip_is_lossless(trained):
    tok, _, texts = trained
    samples = [texts[0], "naïve café — ✓ 日本語 \t\r\n  spaces", "\x00\x7f bytes"]
    for text, ids in zip(samples, encode_plain(tok, samples), strict=True):
        assert tok.decode(ids) == text
    assert tok.get_vocab_size() == 400


def test_special_tokens_have_fixed_single_ids(trained):
    tok, _, _ = trained
    ids = special_token_ids(tok)
    assert list(ids) == list(SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(len(SPECIAL_TOKENS)))
    for token, i in ids.items():
        assert tok.encode(token).ids == [i]


def test_special_spelling_in_document_text_is_not_a_special_token(trained):
    tok, _, _ = trained
    (ids,) = encode_plain(tok, [f"a {EOS} b"])
    assert special_token_ids(tok)[EOS] not in ids
    assert tok.decode(ids) == f"a {EOS} b"


def test_save_load_same_fingerprint(trained):
    tok, path, _ = trained
    loaded = load_tokenizer(path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert loaded.encode("def f(x): return x").ids == tok.encode("def f(x): return x").ids


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=f"tokenizer file not found: {tmp_path / 'x.json'}"):
        load_tokenizer(tmp_path / "x.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(ValueError, match=f"corrupt.*{bad}"):
        load_tokenizer(bad)


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["x"], vocab_size=100)
