"""Token shards: plain-WebDataset round trip, index.json, key validation."""

from __future__ import annotations

import json
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mmfm.data.readers import read_code_tree
from mmfm.data.shards import iter_shard_docs, read_index, validate_key, write_token_shards
from mmfm.data.tokenizer import EOS, encode_plain, tokenizer_fingerprint, train_tokenizer

STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = list(read_code_tree(STDLIB_JSON, source="stdlib_json"))
    docs.append({"text": f"text that mentions {EOS} literally", "source": "x", "id": "x/1"})
    docs.append({"text": "", "source": "x", "id": "x/empty"})
    tok = train_tokenizer((d["text"] for d in docs), vocab_size=400,
                          out_path=root / "tokenizer.json")
    index = write_token_shards(iter(docs), root / "tokenizer.json", root / "out",
                               docs_per_shard=2)
    return tok, docs, index, root / "out"


def test_plain_webdataset_reads_every_document(written):
    tok, docs, index, out = written
    urls = [str(out / s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    real = [d for d in docs if d["text"]]
    assert len(samples) == len(real)
    eos = tok.token_to_id(EOS)
    for sample, doc, ids in zip(samples, real, encode_plain(tok, [d["text"] for d in real]),
                                strict=True):
        assert sample["ids.npy"].dtype == np.int32
        assert sample["ids.npy"].tolist() == ids + [eos]
        assert tok.decode(sample["ids.npy"][:-1].tolist()) == doc["text"]
        meta = sample["json"]
        assert (meta["id"], meta["source"], meta["n_tokens"]) == (
            doc["id"], doc["source"], len(ids) + 1)
    # The literal "<|endoftext|>" in the text did not become a document separator.
    assert samples[-1]["ids.npy"].tolist().count(eos) == 1


def test_index_contents(written):
    tok, docs, index, out = written
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == index == read_index(out)
    n_docs = sum(1 for d in docs if d["text"])
    assert [s["name"] for s in index["shards"]] == [
        f"shard-{i:06d}.tar" for i in range((n_docs + 1) // 2)]
    assert all(s["samples"] == 2 for s in index["shards"][:-1])
    assert index["num_samples"] == n_docs and index["skipped_empty"] == 1
    total = sum(len(ids) for _, ids, _ in
                (x for s in index["shards"] for x in iter_shard_docs(out / s["name"])))
    assert index["num_tokens"] == total == sum(s["tokens"] for s in index["shards"])
    assert index["vocab_size"] == tok.get_vocab_size() == 400
    assert index["tokenizer_sha256"] == tokenizer_fingerprint(tok)
    assert index["eos_id"] == tok.token_to_id(EOS)
    assert set(index["sources"]) == {"stdlib_json", "x"}
    assert not list(out.glob(".*.tmp"))


def test_tar_members_are_plain(written):
    _, _, index, out = written
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert names == ["shard000000000.ids.npy", "shard000000000.json",
                     "shard000000001.ids.npy", "shard000000001.json"]


@pytest.mark.parametrize("key", ["a/b", "..", "a\\b", "a.b", ""])
def test_bad_keys_rejected(key):
    with pytest.raises(ValueError, match="invalid shard key"):
        validate_key(key)


def test_document_key_is_validated(written, tmp_path):
    tok, _, _, _ = written
    with pytest.raises(ValueError, match="invalid shard key '../evil'"):
        write_token_shards([{"text": "x", "key": "../evil"}], tok, tmp_path)


def test_read_index_errors(tmp_path):
    with pytest.raises(ValueError, match=f"shard directory does not exist: {tmp_path / 'no'}"):
        read_index(tmp_path / "no")
    with pytest.raises(ValueError, match=f"no token shards in {tmp_path}"):
        read_index(tmp_path)
