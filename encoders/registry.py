"""The modality-encoder protocol and a registry of encoder factories.

An encoder turns raw media (an image, an audio clip) into a sequence of embeddings that the
decoder receives at placeholder positions. Concrete encoders (OpenCLIP vision tower, patch
embedding, log-mel audio) register themselves here; see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ModalityEncoder(Protocol):
    """What the fusion code relies on, and nothing more."""

    modality: str  # "image" or "audio"

    def preprocess(self, raw: Any) -> Tensor:
        """Decode-side transform of one raw item into the tensor `forward` batches."""

    def num_tokens(self, raw: Any) -> int:
        """How many placeholder tokens this item occupies in the token stream."""

    def forward(self, batch: Tensor) -> Tensor:
        """(N, ...) preprocessed items -> (N, T, D_enc) embeddings."""


EncoderFactory = Callable[..., ModalityEncoder]


class EncoderRegistry:
    """Name -> factory. An instance, not module state, so tests and runs never interfere."""

    def __init__(self) -> None:
        self._factories: dict[str, EncoderFactory] = {}

    def register(self, name: str, factory: EncoderFactory) -> None:
        if name in self._factories:
            raise ValueError(f"encoder {name!r} is already registered")
        self._factories[name] = factory

    def build(self, name: str, **kwargs: Any) -> ModalityEncoder:
        if name not in self._factories:
            known = ", ".join(sorted(self._factories)) or "none"
            raise ValueError(f"unknown encoder {name!r}; registered: {known}")
        return self._factories[name](**kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)
