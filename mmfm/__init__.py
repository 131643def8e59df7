"""mmfm: pretraining Mixture-of-Experts foundation models on interleaved text, image and audio."""

__version__ = "0.1.0"
