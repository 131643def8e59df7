"""Multimodal shard format: write -> read round trip (with mmfm and with plain webdataset and
tarfile), shard naming and size limits, key validation."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from test_mm_common import photo_items, speech_items  # noqa: F401 (fixtures)

from mmfm.data.mm_shards import decode_document, iter_raw_samples, read_mm_index, write_mm_shards
from mmfm.encoders.media import Waveform, decode_audio


def _docs(photo_items, speech_items):  # noqa: F811
    astronaut = next(i for i in photo_items if i.name == "astronaut")
    hopper = next(i for i in photo_items if i.name == "grace_hopper")
    speech = speech_items[0]
    array = np.asarray(Image.open(io.BytesIO(astronaut.data)))
    return [
        {"key": "a", "segments": [{"text": astronaut.text}, {"image": array},
                                  {"audio": speech.data, "format": "wav"}, {"text": speech.text}],
         "source": "test", "license": astronaut.license, "language": "en"},
        {"key": "b", "segments": [{"image": hopper.data, "format": "jpg"}, {"text": hopper.text},
                                  {"audio": decode_audio(speech.data)}]},
        {"key": "c", "segments": [{"text": "only text"}]},
    ]


def test_round_trip_with_mmfm(tmp_path, photo_items, speech_items):  # noqa: F811
    docs = _docs(photo_items, speech_items)
    index = write_mm_shards(docs, tmp_path, name="set", max_samples=2)
    assert [s["name"] for s in index["shards"]] == ["set-000000.tar", "set-000001.tar"]
    assert index["pattern"] == "set-{000000..000001}.tar"
    assert index["num_samples"] == 3 and [s["samples"] for s in index["shards"]] == [2, 1]
    assert read_mm_index(tmp_path)["shards"][0]["images"] == 2
    raws = [r for s in index["shards"] for r in iter_raw_samples(tmp_path / s["name"])]
    assert [r.key for r in raws] == ["a", "b", "c"]
    segments, meta = decode_document(raws[0])
    assert [k for k, _ in segments] == ["text", "image", "audio", "text"]
    assert meta == {"source": "test", "license": docs[0]["license"], "language": "en"}
    assert np.array_equal(np.asarray(segments[1][1]), np.asarray(docs[0]["segments"][1]["image"]))
    wave = decode_audio(speech_items[0].data)
    assert segments[2][1].sample_rate == wave.sample_rate == 8000
    np.testing.assert_array_equal(segments[2][1].samples, wave.samples)  # stored as is (wav)
    seg_b, _ = decode_document(raws[1])
    np.testing.assert_allclose(seg_b[2][1].samples, wave.samples, atol=1 / 32768)  # FLAC, 16 bit
    assert decode_document(raws[2])[0] == [("text", "only text")]


def test_plain_webdataset_and_tar_read_the_shards(tmp_path, photo_items, speech_items):  # noqa: F811
    index = write_mm_shards(_docs(photo_items, speech_items), tmp_path, name="set", max_samples=2)
    url = str(tmp_path / index["pattern"])
    samples = list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    first = samples[0]
    assert set(first) >= {"json", "0.png", "1.wav"}
    assert first["json"]["segments"] == [{"text": _docs(photo_items, speech_items)[0]["segments"][0]["text"]},
                                         {"image": "0.png"}, {"audio": "1.wav"},
                                         {"text": speech_items[0].text}]
    assert first["0.png"].size == (512, 512)
    with tarfile.open(tmp_path / "set-000000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["a.json", "a.0.png", "a.1.wav", "b.json"]
    meta = json.loads(tarfile.open(tmp_path / "set-000000.tar").extractfile("b.json").read())
    assert meta["segments"][2] == {"audio": "1.flac"}


def test_shard_size_limit_in_bytes(tmp_path, photo_items):  # noqa: F811
    docs = [{"key": f"k{i}", "segments": [{"image": it.data, "format": it.fmt}, {"text": it.text}]}
            for i, it in enumerate(photo_items[:6])]
    biggest = max(len(d["segments"][0]["image"]) for d in docs)
    index = write_mm_shards(docs, tmp_path, max_samples=100, max_bytes=biggest + 4096)
    assert len(index["shards"]) >= 3
    assert all(s["bytes"] <= biggest + 4096 + 10240 for s in index["shards"] if s["samples"] > 1)
    assert sum(s["samples"] for s in index["shards"]) == 6


@pytest.mark.parametrize("key", ["a/b", "../x", "..", "a.b", "a\\b", ""])
def test_writer_rejects_unsafe_keys(tmp_path, key):
    with pytest.raises(ValueError, match="invalid shard key"):
        write_mm_shards([{"key": key, "segments": [{"text": "x"}]}], tmp_path)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    docs = [{"key": "e1", "segments": []}, {"key": "e2", "segments": [{"text": ""}]},
            {"key": "ok", "segments": [{"text": "hello"}]}]
    index = write_mm_shards(docs, tmp_path)
    assert index["num_samples"] == 1 and index["skipped_empty"] == 2


def test_writer_rejects_media_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_mm_shards([{"segments": [{"image": b"\x89PNG", "format": "bmp"}]}], tmp_path)
    with pytest.raises(ValueError, match="none of text, image, audio"):
        write_mm_shards([{"segments": [{"video": b"x"}]}], tmp_path)
    with pytest.raises(ValueError, match="cannot store"):
        write_mm_shards([{"segments": [{"audio": [0.0, 0.1]}]}], tmp_path)
    assert Waveform  # the type the writer stores as FLAC
