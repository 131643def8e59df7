"""Raw media: decoding shard members into what encoders preprocess, and encoding media into
members when shards are written.

Images decode with Pillow into RGB `PIL.Image.Image` (transparency composited onto white,
as the stamps are drawn for a white canvas). Audio decodes with `soundfile` into a mono
float32 `Waveform`. Every failure is a `MediaError` whose message says what was wrong, so
the loader can skip-and-count or stop naming the shard and key.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmfm.encoders.config import MODALITIES
from mmfm.errors import UserValueError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
AUDIO_EXTS = ("flac", "wav", "ogg")
MODALITY_IDS = {name: i for i, name in enumerate(MODALITIES)}  # text 0, image 1, audio 2


# One image decode stays under ~100 MB: the worst path (RGBA with transparency composited onto
# a white RGBA canvas, then an RGB copy) holds 4 + 4 + 3 bytes per pixel, so 2^23 pixels
# (8.4 MP, e.g. 4096 x 2048) is ~92 MB. Pillow's own bomb guard starts at ~89 MP.
DEFAULT_MAX_IMAGE_PIXELS = 2**23


class MediaError(UserValueError):
    """A media member that cannot be decoded (truncated, corrupt, unsupported, empty)."""


class MediaTooLarge(MediaError):
    """An image over the pixel budget: skipped before it is decoded."""


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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes of a PNG/JPEG/WebP -> fully decoded RGB image (MediaError if it is not one).
    The size is read from the header first: over `max_pixels` raises MediaTooLarge without
    decoding (a 20000 x 20000 PNG of a few KB would otherwise take minutes and gigabytes)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise MediaTooLarge(f"image of {width} x {height} pixels is over the budget of "
                                    f"{max_pixels} pixels (multimodal.max_image_pixels)")
            img.load()  # decode now: a truncated file fails here, not later in a worker
            return to_rgb(img)
    except MediaTooLarge:
        raise
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
        with sf.SoundFile(io.BytesIO(data)) as f:
            claimed = f.frames
            samples = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (RuntimeError, ValueError, TypeError, sf.LibsndfileError) as err:
        raise MediaError(f"undecodable audio ({type(err).__name__}: {err})") from None
    if samples.shape[0] == 0:
        raise MediaError("audio has no samples")
    # libsndfile trims a WAV's frame count to the bytes present, so read its header ourselves.
    claimed = max(claimed, wav_declared_frames(data) or 0)
    if samples.shape[0] < claimed:
        raise MediaError(f"audio is shorter than its header claims ({samples.shape[0]} of "
                         f"{claimed} frames: truncated)")
    return Waveform(samples.mean(axis=1).astype(np.float32), int(rate))


def wav_declared_frames(data: bytes) -> int | None:
    """Frames a RIFF/WAVE header declares (data chunk size / block align), None if `data` is
    not a WAV or the header is incomplete. Walks the chunks as the RIFF format lays them out."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, block_align = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if chunk == b"fmt " and offset + 22 <= len(data):
            block_align = struct.unpack("<H", data[offset + 20:offset + 22])[0]
        if chunk == b"data":
            return size // block_align if block_align else None
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


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

    def pin_memory(self) -> MediaTensors:
        return MediaTensors(*(t.pin_memory() for t in (self.data, self.lengths, self.num_tokens)))

    def __len__(self) -> int:
        return int(self.num_tokens.shape[0])
