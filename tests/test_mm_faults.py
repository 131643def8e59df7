"""Multimodal shards and media under hostile input (data/mm_shards.py, data/mm_loader.py,
encoders/media.py): garbage mid-tar, counts against the index, an image over the pixel budget,
audio shorter than its header claims, tar members with '..' or absolute paths."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from test_mm_common import tiny_encoders

from mmfm.data.mm_loader import iter_mm_eval_batches
from mmfm.data.mm_shards import (
    RawSample,
    SampleError,
    ShardError,
    decode_document,
    iter_raw_samples,
    write_mm_shards,
)
from mmfm.encoders.media import MediaError, MediaTooLarge, Waveform, decode_audio, decode_image

N = 20


def small_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    docs = [{"segments": [{"text": f"picture number {i} shows"}, {"image": small_image(i)}]}
            for i in range(N)]
    write_mm_shards(docs, tmp_path / "mm", max_samples=N)
    return tmp_path / "mm"


def member_offset(path: Path, number: int) -> int:
    with tarfile.open(path) as tar:
        return tar.getmembers()[number].offset


def eval_docs(shard_dir: Path, tokenizer: Path, strict: bool = False) -> int:
    batches = iter_mm_eval_batches([("s", shard_dir)], tokenizer, 64, 2, tiny_encoders(),
                                   strict=strict)
    return sum(int((b.labels != -100).sum()) > 0 for b in batches)


@pytest.mark.slow
def test_garbage_mid_tar_is_counted_lenient_and_named_strict(shard_dir, text_data, caplog):
    path = shard_dir / "mm-000000.tar"
    at = member_offset(path, 2 * 8)  # the json header of sample 9 (json + png per sample)
    data = bytearray(path.read_bytes())
    data[at:at + 512] = b"\x13" * 512
    path.write_bytes(bytes(data))
    with tarfile.open(path) as tar:  # tarfile alone: a silent end after 8 samples
        assert len(tar.getmembers()) == 16
    keys = []
    with pytest.raises(ShardError, match=f"damaged tar header at byte {at}"):
        for raw in iter_raw_samples(path):
            keys.append(raw.key)
    assert len(keys) == 7  # the 8th may have lost members to the damage: dropped, counted
    with caplog.at_level(logging.WARNING, logger="mmfm.data.mm_loader"):
        assert eval_docs(shard_dir, text_data["tokenizer"]) > 0
    assert f"damaged tar header at byte {at}" in caplog.text
    assert f"read 7 samples but its index lists {N}" in caplog.text
    with pytest.raises(ShardError, match=f"mm-000000.tar: damaged tar header at byte {at}"):
        eval_docs(shard_dir, text_data["tokenizer"], strict=True)


def test_index_count_differing_from_the_shard_is_reported(shard_dir, text_data):
    index = json.loads((shard_dir / "index.json").read_text())
    index["shards"][0]["samples"] = N + 5
    (shard_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match=f"read {N} samples but its index lists {N + 5}"):
        eval_docs(shard_dir, text_data["tokenizer"], strict=True)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_image_over_the_pixel_budget_is_refused_before_decoding():
    bomb = png(8192, 8192)  # 67 MP of zeros: a few KB compressed
    assert len(bomb) < 200_000
    with pytest.raises(MediaTooLarge, match=r"8192 x 8192 pixels is over the budget of 8388608"):
        decode_image(bomb)
    assert decode_image(png(4096, 2048)).size == (4096, 2048)  # exactly the default budget
    with pytest.raises(MediaTooLarge):
        decode_image(png(64, 64), max_pixels=64 * 63)
    raw = RawSample("big", {"json": json.dumps({"segments": [{"image": "0.png"}]}).encode(),
                            "0.png": png(64, 64)})
    with pytest.raises(SampleError) as info:
        decode_document(raw, max_image_pixels=1000)
    assert info.value.reason == "image_too_large"
    assert decode_document(raw)[0][0][0] == "image"


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_audio_shorter_than_its_header_claims_is_corrupt():
    whole = wav_bytes()
    assert isinstance(decode_audio(whole), Waveform)
    cut = whole[: len(whole) // 2]
    info = sf.info(io.BytesIO(cut))  # libsndfile itself trims the count and reads quietly
    assert info.frames < 16000
    with pytest.raises(MediaError, match=r"shorter than its header claims \(\d+ of 16000 frames"):
        decode_audio(cut)
    raw = RawSample("cut", {"json": json.dumps({"segments": [{"audio": "0.wav"}]}).encode(),
                            "0.wav": cut})
    with pytest.raises(SampleError) as err:
        decode_document(raw)
    assert err.value.reason == "corrupt_audio"


@pytest.mark.parametrize("name", ["../mm000000001.0.png", "/abs/mm000000001.0.png",
                                  "a/../../mm000000001.0.png"])
def test_members_with_dotdot_or_absolute_paths_are_refused_and_counted(tmp_path, text_data, name):
    d = tmp_path / "unsafe"
    docs = [{"segments": [{"text": f"caption {i}"}, {"image": small_image(i)}]} for i in range(4)]
    write_mm_shards(docs, d, max_samples=10)
    path = d / "mm-000000.tar"
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    members = [(name if m == "mm000000001.0.png" else m, data) for m, data in members]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            info = tarfile.TarInfo(m)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raws = list(iter_raw_samples(path))
    unsafe = [r for r in raws if r.unsafe]
    assert len(unsafe) == 1 and unsafe[0].unsafe == [name]
    assert all(name not in r.members and "0.png" not in r.members for r in unsafe)
    with pytest.raises(SampleError) as info:
        decode_document(unsafe[0])
    assert info.value.reason == "unsafe_member"
    with pytest.raises(ValueError, match=r"unsafe_member: member .* has an absolute path or '..'"):
        eval_docs(d, text_data["tokenizer"], strict=True)
