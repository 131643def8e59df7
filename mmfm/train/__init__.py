"""Training: optimizer and schedule, checkpoints, the training loop."""

from mmfm.train.checkpoint import CheckpointError
from mmfm.train.trainer import Trainer, TrainResult

__all__ = ["CheckpointError", "TrainResult", "Trainer"]
