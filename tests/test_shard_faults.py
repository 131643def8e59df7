"""Damaged token shards and hostile indexes (data/tar_scan.py, data/shards.py, data/loader.py).

Planted faults where the right answer is known: a 100-document shard whose 41st sample header
is overwritten (Python's tarfile silently ends the archive there: 40 of 100 read), truncated
and random-byte files, ids outside the vocabulary, indexes naming files outside their folder
or the validation split."""

from __future__ import annotations

import io
import json
import logging
import os
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mmfm.data.loader import OutOfVocabulary, TokenLoader, iter_eval_batches, read_shard_checked
from mmfm.data.readers import read_code_tree
from mmfm.data.shards import check_disjoint_splits, iter_shard_docs, read_index, write_token_shards
from mmfm.data.tar_scan import ShardError, iter_tar_files
from mmfm.data.tokenizer import train_tokenizer
from mmfm.errors import UserValueError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
N = 100


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """One shard of 100 real documents (stdlib json/ and email/ sources), vocab 320."""
    root = tmp_path_factory.mktemp("faults")
    found = [d for d in read_code_tree([STDLIB / "json", STDLIB / "email"], source="stdlib")
             if d["text"].strip()]
    docs = [{"text": d["text"][: 40 + (i * 397) % 600], "source": "stdlib"}
            for i, d in enumerate((found * 4)[:N])]
    tok = train_tokenizer((d["text"] for d in docs), vocab_size=320)
    index = write_token_shards(docs, tok, root / "train", docs_per_shard=N)
    assert index["shards"][0]["samples"] == N
    return root / "train"


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def shard_of(d: Path) -> Path:
    return d / read_index(d)["shards"][0]["name"]


def member_offset(path: Path, number: int) -> int:
    with tarfile.open(path) as tar:
        return tar.getmembers()[number].offset


@pytest.fixture
def garbage_mid(clean, tmp_path) -> tuple[Path, int]:
    d = copy_dir(clean, tmp_path / "mid")
    path = shard_of(d)
    at = member_offset(path, 2 * 40)  # the header of sample 41 (two members per sample)
    data = bytearray(path.read_bytes())
    data[at:at + 512] = b"\x13" * 512
    path.write_bytes(bytes(data))
    return d, at


def test_tarfile_alone_silently_stops_at_the_garbage(garbage_mid):
    d, _ = garbage_mid
    with tarfile.open(shard_of(d)) as tar:  # what the readers relied on
        assert len(tar.getmembers()) == 80


def test_garbage_mid_tar_is_an_error_naming_shard_and_byte(garbage_mid):
    d, at = garbage_mid
    path = shard_of(d)
    seen = []
    with pytest.raises(ShardError) as info:
        for key, _ids, _meta in iter_shard_docs(path):
            seen.append(key)
    assert len(seen) == 40  # the samples before the damage are still read
    assert str(info.value).startswith(f"shard {path}: damaged tar header at byte {at}")
    assert "\n" not in str(info.value)


def test_lenient_read_counts_and_logs_strict_read_stops(garbage_mid, caplog):
    d, at = garbage_mid
    skipped: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="mmfm.data.loader"):
        docs = read_shard_checked(shard_of(d), N, 320, strict=False, skipped=skipped)
    assert len(docs) == 40
    assert skipped == {"bad_shard": 1, "index_mismatch_samples": 60}
    assert f"byte {at}" in caplog.text and "read 40 samples but its index lists 100" in caplog.text
    with pytest.raises(ShardError, match=f"damaged tar header at byte {at}"):
        read_shard_checked(shard_of(d), N, 320, strict=True, skipped=None)


def test_token_loader_counts_in_lenient_mode_and_stops_in_strict(garbage_mid):
    d, at = garbage_mid
    loader = TokenLoader(d, seq_len=32, micro_batch_size=2)
    for _ in range(3):
        next(loader)
    assert loader.skipped == {"bad_shard": 1, "index_mismatch_samples": 60}
    assert loader.state_dict()["worker_states"][0]["skipped"] == loader.skipped
    with pytest.raises(ShardError, match=f"byte {at}"):
        next(TokenLoader(d, seq_len=32, micro_batch_size=2, strict=True))
    skipped: dict[str, int] = {}
    assert len(list(iter_eval_batches(d, 32, 2, skipped=skipped))) > 0
    assert skipped == {"bad_shard": 1, "index_mismatch_samples": 60}
    with pytest.raises(ShardError, match=f"byte {at}"):
        list(iter_eval_batches(d, 32, 2, strict=True))


def test_count_differing_from_the_index_is_reported(clean, tmp_path):
    d = copy_dir(clean, tmp_path / "count")
    index = json.loads((d / "index.json").read_text())
    index["shards"][0]["samples"] = N + 1
    (d / "index.json").write_text(json.dumps(index))
    skipped: dict[str, int] = {}
    assert len(read_shard_checked(shard_of(d), N + 1, 320, False, skipped)) == N
    assert skipped == {"index_mismatch_samples": 1}
    with pytest.raises(ShardError, match="read 100 samples but its index lists 101"):
        list(iter_eval_batches(d, 32, 2, strict=True))


@pytest.mark.parametrize("cut, fragment", [
    (lambda data, at: data[: len(data) // 2], "is truncated ("),
    (lambda data, at: data[:at], "is truncated at byte"),  # cut exactly at a member boundary
    (lambda data, at: b"", "is not a tar file"),
    (lambda data, at: np.random.default_rng(0).bytes(len(data)), "is not a tar file"),
])
def test_truncated_and_random_shards_are_one_line(clean, tmp_path, cut, fragment):
    d = copy_dir(clean, tmp_path / "cut")
    path = shard_of(d)
    at = member_offset(path, 2 * 40)
    path.write_bytes(cut(path.read_bytes(), at))
    with pytest.raises(ShardError) as info:
        list(iter_tar_files(path))
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ShardError):
        list(iter_eval_batches(d, 32, 2, strict=True))


def test_clean_shard_reads_like_webdataset(clean):
    path = shard_of(clean)
    ours = [(k, ids.tolist()) for k, ids, _ in iter_shard_docs(path)]
    theirs = [(s["__key__"], s["ids.npy"].tolist())
              for s in wds.WebDataset(str(path), shardshuffle=False).decode()]
    assert ours == theirs and len(ours) == N


def plant_shard(d: Path, samples: list[tuple[str, np.ndarray]], vocab_size: int = 320,
                names: list[str] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(d / "shard-000000.tar")) as tar:
        for key, ids in samples:
            tar.write({"__key__": key, "ids.npy": ids.astype(np.int32), "json": {}})
    shards = [{"name": n, "samples": len(samples), "tokens": 0}
              for n in (names or ["shard-000000.tar"])]
    (d / "index.json").write_text(json.dumps({
        "format": "mmfm-token-shards", "shards": shards, "vocab_size": vocab_size,
        "pad_id": 0, "eos_id": 1}))
    return d


def test_token_ids_outside_the_vocabulary_are_refused_by_name(tmp_path):
    ok = np.arange(2, 60)
    d = plant_shard(tmp_path / "oov", [("a", ok), ("bad", np.array([5, 320, 7])), ("c", ok)])
    for strict in (False, True):
        with pytest.raises(OutOfVocabulary, match=r"sample 'bad' holds token id 320, outside "
                                                  r"the vocabulary \[0, 320\)"):
            list(iter_eval_batches(d, 16, 2, strict=strict))
        with pytest.raises(OutOfVocabulary, match="token id 320"):
            next(TokenLoader(d, seq_len=16, micro_batch_size=1, strict=strict))
    neg = plant_shard(tmp_path / "neg", [("a", ok), ("minus", np.array([5, -4]))])
    with pytest.raises(OutOfVocabulary, match="sample 'minus' holds token id -4"):
        list(iter_eval_batches(neg, 16, 2))


@pytest.mark.parametrize("name", ["../val/shard-000000.tar", "/etc/passwd", "sub/shard.tar", "..",
                                  "..\\\\x.tar"])
def test_index_naming_files_outside_its_folder_is_refused(tmp_path, name):
    d = plant_shard(tmp_path / "esc", [("a", np.arange(2, 9))], names=[name])
    with pytest.raises(UserValueError, match=r"shards\[0\].name=.* must be a file name inside"):
        read_index(d)


def test_unsafe_member_names_are_refused(tmp_path):
    d = tmp_path / "unsafe"
    d.mkdir()
    with tarfile.open(d / "shard-000000.tar", "w") as tar:
        buf = io.BytesIO()
        np.save(buf, np.arange(3, dtype=np.int32))
        info = tarfile.TarInfo("../../outside.ids.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(ShardError, match=r"member '../../outside.ids.npy' has an absolute path or '..'"):
        list(iter_shard_docs(d / "shard-000000.tar"))


def test_train_index_naming_validation_shards_is_refused(clean, tmp_path):
    val = copy_dir(clean, tmp_path / "val")
    other = copy_dir(clean, tmp_path / "other")
    check_disjoint_splits(other, val)  # equal content, different files: allowed
    with pytest.raises(UserValueError, match=r"names validation shards of .*val \(shard-000000.tar\)"):
        check_disjoint_splits(val, val, "data.train_shards")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "index.json").write_text((val / "index.json").read_text())
    os.symlink(shard_of(val), linked / shard_of(val).name)
    with pytest.raises(UserValueError, match="names validation shards"):
        check_disjoint_splits(linked, val)


def test_text_task_refuses_validation_shards_as_training_data(text_data, tmp_path):
    from conftest import tiny_config

    from mmfm.train.task import TextTask

    cfg = tiny_config(text_data, tmp_path, **{"data.val_shards": str(text_data["train"])})
    with pytest.raises(UserValueError, match=r"data.train_shards: the train index in .* names "
                                             r"validation shards"):
        TextTask(cfg).train_loader()
    TextTask(tiny_config(text_data, tmp_path)).train_loader()  # distinct splits: fine


def test_text_task_reports_skipped_counts_as_metrics(text_data, tmp_path):
    import torch
    from conftest import tiny_config

    from mmfm.train.task import TextTask

    d = copy_dir(text_data["train"], tmp_path / "damaged")
    for shard in read_index(d)["shards"]:  # damage every shard after half its samples
        path = d / shard["name"]
        at = member_offset(path, 2 * (shard["samples"] // 2))
        data = bytearray(path.read_bytes())
        data[at:at + 512] = b"\x13" * 512
        path.write_bytes(bytes(data))
    task = TextTask(tiny_config(text_data, tmp_path, **{"data.train_shards": str(d)}))
    loader = task.train_loader()
    with torch.no_grad():
        out = task.loss(task.build_model(), next(loader))
    assert set(out.metrics) == {"data/skipped_bad_shard", "data/skipped_index_mismatch_samples"}
    assert out.metrics["data/skipped_bad_shard"] == 1.0
