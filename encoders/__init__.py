"""Modality encoders (imported as `mmfm.encoders`): the protocol every encoder follows and the
registry that builds them by name. The concrete image and audio encoders are issue 5's work."""

from mmfm.encoders.registry import EncoderRegistry, ModalityEncoder

__all__ = ["EncoderRegistry", "ModalityEncoder"]
