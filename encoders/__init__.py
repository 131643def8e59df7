"""Modality encoders (imported as `mmfm.encoders`): the protocol every encoder follows, the
registry that builds them by name, the built-in image and audio encoders, projectors, raw
media decoding and the multimodal config section."""

from mmfm.encoders.config import EncoderConfig, MultimodalConfig, SourceConfig
from mmfm.encoders.registry import (
    EncoderRegistry,
    ModalityEncoder,
    build_preprocessor,
    default_registry,
)

__all__ = ["EncoderConfig", "EncoderRegistry", "ModalityEncoder", "MultimodalConfig",
           "SourceConfig", "build_preprocessor", "default_registry"]
