"""Model math: layers, the decoder, parameter and FLOP counting. No distributed code."""

from mmfm.model.decoder import IGNORE_INDEX, Block, Decoder, DecoderOutput, lm_loss

__all__ = ["IGNORE_INDEX", "Block", "Decoder", "DecoderOutput", "lm_loss"]
