"""Bad input, built on purpose: truncated/corrupt image and audio members, a JSON that names a
missing member, an unsupported media type, an empty document, bad JSON, a shard that is
not a tar and one that breaks off. Lenient: skipped and counted, training data still flows.
Strict: a ValueError naming the shard and the key."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from test_mm_common import (  # noqa: F401 (fixtures)
    caption_docs,
    photo_items,
    speech_items,
    tiny_encoders,
)

from mmfm.data.mm_loader import MMLoader, ReaderPipeline, iter_mm_eval_batches
from mmfm.data.mm_shards import INDEX_FORMAT, write_mm_shards


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _json(segments) -> bytes:
    return json.dumps({"segments": segments}).encode()


def _bad_samples(photo_items, speech_items) -> dict[str, list[tuple[str, bytes]]]:  # noqa: F811
    png = next(i for i in photo_items if i.fmt == "png").data
    wav = speech_items[0].data if speech_items else b"RIFF"
    return {
        "corrupt_image": [("trunc.json", _json([{"image": "0.png"}, {"text": "cut"}])),
                          ("trunc.0.png", png[:len(png) // 2])],
        "corrupt_audio": [("noise.json", _json([{"audio": "0.flac"}, {"text": "hm"}])),
                          ("noise.0.flac", b"fLaC" + bytes(range(256)) * 4)],
        "missing_member": [("orphan.json", _json([{"text": "see"}, {"image": "0.png"}]))],
        "unsupported_media": [("video.json", _json([{"video": "0.mp4"}])),
                              ("video.0.mp4", wav[:100])],
        "empty_document": [("empty.json", _json([]))],
        "bad_json": [("broken.json", b"{\"segments\": [")],
    }


def _shard_set(root: Path, good_docs: list[dict], bad_tar: list[tuple[str, bytes]] | None,
               garbage: bytes | None = None) -> Path:
    """A shard set: good shards, plus one shard holding the bad samples (or garbage bytes)."""
    index = write_mm_shards(good_docs, root, max_samples=2)
    name = "mm-000099.tar"
    if garbage is not None:
        (root / name).write_bytes(garbage)
    else:
        _tar(root / name, bad_tar)
    index["shards"].append({"name": name, "samples": 1})
    index["format"] = INDEX_FORMAT
    (root / "index.json").write_text(json.dumps(index))
    return root


def _one_epoch_counts(root: Path, tokenizer: Path) -> dict[str, int]:
    loader = MMLoader([("s", root, 1.0)], tokenizer, 64, 2, tiny_encoders(), shuffle_buffer=1)
    pipeline = ReaderPipeline(loader.spec, 0, None)
    docs = 0
    while True:  # every sample of epoch 0 through the pipeline's decode path, once
        ref, raw = pipeline.sources[0].next()
        if ref[0] > 0:
            return pipeline.policy.counts, docs
        docs += pipeline._decode(0, ref, raw) is not None


CASES = ["corrupt_image", "corrupt_audio", "missing_member", "unsupported_media",
         "empty_document", "bad_json", "bad_shard", "truncated_shard"]


@pytest.mark.parametrize("case", CASES)
def test_lenient_skips_and_counts(tmp_path, text_data, photo_items, speech_items, case):  # noqa: F811
    good = caption_docs(photo_items[:6], 1, "good")
    root = _build(tmp_path, good, case, photo_items, speech_items)
    counts, docs = _one_epoch_counts(root, text_data["tokenizer"])
    if case.endswith("shard"):  # counted when read; reading the first sample of epoch 1
        # may meet it again. The sample its index lists is missing: counted against the index.
        assert set(counts) == {"bad_shard", "index_mismatch_samples"}
        assert counts["bad_shard"] in (1, 2) and counts["index_mismatch_samples"] == counts["bad_shard"]
        reason = "bad_shard"
    else:
        assert counts == {case: 1}
        reason = case
    assert docs == len(good)  # every good document still arrives
    loader = MMLoader([("s", root, 1.0)], text_data["tokenizer"], 64, 2, tiny_encoders())
    for _ in range(4):
        assert next(loader).num_target_tokens > 0
    assert loader.skipped.get(reason, 0) >= 1


@pytest.mark.parametrize("case", CASES)
def test_strict_names_shard_and_key(tmp_path, text_data, photo_items, speech_items, case):  # noqa: F811
    root = _build(tmp_path, caption_docs(photo_items[:2], 1, "good"), case, photo_items,
                  speech_items)
    loader = MMLoader([("s", root, 1.0)], text_data["tokenizer"], 64, 2, tiny_encoders(),
                      strict=True, shuffle_buffer=1)
    if case.endswith("shard"):
        match = r"shard .*mm-000099\.tar( is not a tar file|: member 'late.0.png' at byte \d+ is truncated)"
    else:
        key = _bad_samples(photo_items, speech_items)[case][0][0].split(".")[0]
        match = rf"shard .*mm-000099\.tar: sample '{key}': {case}"
    with pytest.raises(ValueError, match=match):
        for _ in range(20):
            next(loader)
    with pytest.raises(ValueError, match=match):
        list(iter_mm_eval_batches([("s", root)], text_data["tokenizer"], 64, 2, tiny_encoders(),
                                  strict=True))


def _build(tmp_path, good, case, photo_items, speech_items) -> Path:  # noqa: F811
    if case == "bad_shard":
        return _shard_set(tmp_path, good, None, garbage=b"this is not a tar file\n" * 40)
    if case == "truncated_shard":
        buf = io.BytesIO()
        bad = tmp_path / "whole.tar"
        _tar(bad, [("late.json", _json([{"text": "lost"}]))] * 1 +
             [("late.0.png", next(i for i in photo_items if i.fmt == "png").data)])
        data = bad.read_bytes()
        buf.write(data[:len(data) // 2])
        return _shard_set(tmp_path / "set", good, None, garbage=buf.getvalue())
    return _shard_set(tmp_path, good, _bad_samples(photo_items, speech_items)[case])
