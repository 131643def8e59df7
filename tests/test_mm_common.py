"""Shared helpers and fixtures of the multimodal tests (imported by tests/test_mm_*.py).

Media are real: scikit-image's, scikit-learn's and matplotlib's bundled photos (installed
with mmfm) and, when Debian's asterisk-core-sounds-en(-wav) can be fetched, transcribed
speech. Fixtures that need speech skip with the reason when it cannot be had.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmfm.encoders.config import EncoderConfig

MEDIA_CACHE = Path(os.environ.get("MMFM_MEDIA_CACHE", Path.home() / ".cache" / "mmfm" / "media"))


def tiny_encoders() -> dict[str, EncoderConfig]:
    """Small, fast encoders: 32 px images in 16 px patches (4 tokens), 8x-subsampled audio."""
    return {"image": EncoderConfig(kind="patch", width=32, layers=1, heads=2, image_size=32,
                                   patch_size=16),
            "audio": EncoderConfig(kind="whisper", width=32, layers=1, heads=2, n_mels=40,
                                   subsample=8, max_seconds=4.0)}


@pytest.fixture(scope="session")
def photo_items():
    """The captioned photos bundled with scikit-image, scikit-learn and matplotlib."""
    from mmfm.data.mm_media import collect_media

    media = collect_media(["skimage", "sklearn", "matplotlib"], MEDIA_CACHE)
    if len(media.items) < 10:
        pytest.skip(f"too few bundled sample images: {media.by_source()} ({media.notes})")
    return media.items


@pytest.fixture(scope="session")
def speech_items():
    """Asterisk's transcribed English prompts (fetched once into MEDIA_CACHE)."""
    from mmfm.data.mm_media import collect_media

    media = collect_media(["asterisk"], MEDIA_CACHE)
    if not media.items:
        pytest.skip(f"no transcribed speech could be fetched: {media.notes}")
    return media.items


def caption_docs(items, per_doc: int = 2, prefix: str = "doc") -> list[dict]:
    """Interleaved documents [media, text, media, text] from media items, in order."""
    docs = []
    for n in range(0, len(items), per_doc):
        segs = []
        for item in items[n:n + per_doc]:
            segs += [{item.kind: item.data, "format": item.fmt}, {"text": item.text}]
        docs.append({"key": f"{prefix}{n:05d}", "segments": segs, "source": items[n].source,
                     "license": items[n].license})
    return docs


@pytest.fixture(scope="session")
def mm_shards(tmp_path_factory, photo_items, speech_items):
    """Two real shard sets: `photos` (captioned images) and `speech` (audio + transcript),
    each with train (several shards) and val."""
    from mmfm.data.mm_shards import write_mm_shards

    root = tmp_path_factory.mktemp("mm_shards")
    sets = {"photos": caption_docs(photo_items, 2, "photo"),
            "speech": caption_docs(speech_items[:60], 2, "speech")}
    for name, docs in sets.items():
        write_mm_shards(docs[2:], root / name / "train", max_samples=3)
        write_mm_shards(docs[:2], root / name / "val", max_samples=8)
    return root
