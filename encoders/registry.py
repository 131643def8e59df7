"""The modality-encoder protocol and a registry of encoder factories.

An encoder turns raw media (an image, an audio clip) into a sequence of embeddings that the
decoder receives at placeholder positions. The built-in encoders (OpenCLIP vision tower,
patch embedding, Whisper-style audio) are registered by :func:`default_registry`; see
docs/multimodal.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from mmfm.errors import UserValueError


@runtime_checkable
class ModalityEncoder(Protocol):
    """What the fusion code relies on, and nothing more."""

    modality: str  # "image" or "audio"
    out_dim: int  # D_enc, the width of `forward`'s output

    def preprocess(self, raw: Any) -> Tensor:
        """Decode-side transform of one raw item into the tensor `forward` batches."""

    def num_tokens(self, raw: Any) -> int:
        """How many placeholder tokens this item occupies in the token stream."""

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """(N,) valid output tokens per item, from the (N,) lengths its collate returned."""

    def forward(self, batch: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(N, ...) preprocessed items (padded; `lengths` valid per item) -> (N, T, D_enc)."""


EncoderFactory = Callable[..., ModalityEncoder]


class EncoderRegistry:
    """Name -> factory. An instance, not module state, so tests and runs never interfere."""

    def __init__(self) -> None:
        self._factories: dict[str, EncoderFactory] = {}

    def register(self, name: str, factory: EncoderFactory) -> None:
        if name in self._factories:
            raise UserValueError(f"encoder {name!r} is already registered")
        self._factories[name] = factory

    def build(self, name: str, **kwargs: Any) -> ModalityEncoder:
        if name not in self._factories:
            known = ", ".join(sorted(self._factories)) or "none"
            raise UserValueError(f"unknown encoder {name!r}; registered: {known}")
        return self._factories[name](**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)


def default_registry() -> EncoderRegistry:
    """A registry holding the built-in encoders, keyed by `EncoderConfig.kind`; each factory
    takes `cfg=EncoderConfig`."""
    from mmfm.encoders.audio import WhisperStyleAudioEncoder
    from mmfm.encoders.image import OpenCLIPImageEncoder, PatchEmbedEncoder

    registry = EncoderRegistry()
    registry.register("openclip", OpenCLIPImageEncoder)
    registry.register("patch", PatchEmbedEncoder)
    registry.register("whisper", WhisperStyleAudioEncoder)
    return registry


def build_preprocessor(cfg: Any) -> Any:
    """The weight-free, picklable preprocessor of an `EncoderConfig` (for loader workers):
    `preprocess(raw)`, `num_tokens(raw)`, `collate(items) -> (batch, lengths)`."""
    if cfg.modality == "audio":
        from mmfm.encoders.audio import AudioPreprocessor

        return AudioPreprocessor(cfg)
    from mmfm.encoders.image import ImagePreprocessor

    return ImagePreprocessor(cfg)
