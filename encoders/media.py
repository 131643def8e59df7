"""Raw media: decoding shard members into what encoders preprocess, and encoding media into
members when shards are written.

Images decode with Pillow into RGB `PIL.Image.Image` (transparency composited onto white,
as the stamps are drawn for a white canvas). Audio decodes with `soundfile` into a mono
float32 `Waveform`. Every failure is a `MediaError` whose message says what was wrong, so
the loader can skip-and-count or stop naming the shard and key.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmfm.encoders.config import MODALITIES
from mmfm.errors import UserValueError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("flac", "wav", "ogg")
MODALITY_IDS = {name: i for i, name in enumerate(MODALITIES)}  # text 0, image 1, audio 2


class MediaError(UserValueError):
    """A media member that cannot be decoded (truncated, corrupt, unsupported, empty)."""


@dataclass
class Waveform:
    """Mono audio: `samples` (S,) float32 in [-1, 1] at `sample_rate` Hz."""

    samples: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def media_kind(ext: str) -> str | None:
    """"image", "audio" or None for a member extension such as "0.png" or "flac"."""
    suffix = ext.rsplit(".", 1)[-1].lower()
    if suffix in IMAGE_EXTS:
        return "image"
    if suffix in AUDIO_EXTS:
        return "audio"
    return None


def decode_image(data: bytes) -> Image.Image:
    """Bytes of a PNG/JPEG/WebP -> fully decoded RGB image (MediaError if it is not one)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated file fails here, not later in a worker
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise MediaError(f"undecodable image ({type(err).__name__}: {err})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels become white."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_audio(data: bytes) -> Waveform:
    """Bytes of a FLAC/WAV/OGG file -> mono float32 waveform (MediaError if unreadable)."""
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, TypeError, sf.LibsndfileError) as err:
        raise MediaError(f"undecodable audio ({type(err).__name__}: {err})") from None
    if samples.shape[0] == 0:
        raise MediaError("audio has no samples")
    return Waveform(samples.mean(axis=1).astype(np.float32), int(rate))


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    """Lossless PNG bytes of an image or an (H, W) / (H, W, C) uint8/bool/float array."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(_to_uint8(img))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr, dtype=np.float64)
    return (scaled * 255).round().astype(np.uint8)


def encode_flac(wave: Waveform) -> bytes:
    """FLAC (lossless, 16-bit) bytes of a waveform."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave.samples, -1, 1), wave.sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@dataclass
class MediaTensors:
    """One modality's media in a batch: padded items, their lengths, their token counts."""

    data: torch.Tensor  # (N, ...) preprocessed items, padded to the longest
    lengths: torch.Tensor  # (N,) valid length per item as the preprocessor's collate measured it
    num_tokens: torch.Tensor  # (N,) placeholder tokens the loader wrote for each item
    # Set when `data` holds cached encoder outputs (N, P, E) rather than preprocessed media:
    # the fingerprint of the encoder that made them (see mmfm.encoders.features).
    fingerprint: str | None = None

    def to(self, device, non_blocking: bool = False) -> MediaTensors:
        return MediaTensors(*(t.to(device, non_blocking=non_blocking)
                              for t in (self.data, self.lengths, self.num_tokens)),
                            fingerprint=self.fingerprint)

    def __len__(self) -> int:
        return int(self.num_tokens.shape[0])
