"""Precomputed encoder outputs ("features") for frozen encoders: the fingerprint that keys a
feature cache, and the loader-side stand-in for a preprocessor that serves cached features.

Shape legend: N items, P tokens of one item (P_max the longest in a batch), E encoder width.

A frozen tower computes the same output for an item every epoch, so `mmfm data encode` runs it
once and stores its valid output tokens beside the shards (`mmfm.data.mm_features`). A cache
is only valid for the exact weights and preprocessing that made it; the fingerprint hashes
both, and the loader and :class:`mmfm.model.fusion.EncoderSlot` refuse features whose
fingerprint differs from the encoder's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from mmfm.errors import UserValueError

FINGERPRINT_VERSION = 1
# EncoderConfig fields that do not change an encoder's output for a given item: the projector
# and freeze policy act after it, and pretrained_path is covered by hashing the weights.
_NOT_IN_FINGERPRINT = ("projector", "train_mode", "unfreeze_after_steps", "pretrained_path")


class FeatureCacheError(UserValueError):
    """Cached encoder features that the run's encoder did not make (stale, missing, foreign)."""


def preprocessing_key(cfg: Any) -> dict[str, Any]:
    """The fields of an `EncoderConfig` that decide what the encoder outputs for an item."""
    if cfg is None:
        return {}
    return {k: v for k, v in sorted(asdict(cfg).items()) if k not in _NOT_IN_FINGERPRINT}


def encoder_fingerprint(encoder: nn.Module, cfg: Any) -> str:
    """Hex digest of the encoder's weights (names, dtypes, shapes, bytes) and its
    preprocessing config: equal fingerprints mean equal outputs for equal items."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"version": FINGERPRINT_VERSION, "encoder": preprocessing_key(cfg)},
                        sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP/TP): hash the whole weight
            tensor = tensor.full_tensor()
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CachedFeatures:
    """Loader-side preprocessor of a cached modality: items are already (P, E) encoder
    outputs, so `preprocess` passes them through, an item's token count is its P, and
    `collate` pads them into (N, P_max, E) with lengths P. `fingerprint` travels with the
    batch (`MediaTensors.fingerprint`) so the model can check it against its encoder."""

    def __init__(self, modality: str, fingerprint: str, out_dim: int) -> None:
        self.modality, self.fingerprint, self.out_dim = modality, fingerprint, out_dim

    def preprocess(self, feats_PE: Tensor) -> Tensor:
        return feats_PE

    def num_tokens(self, feats_PE: Tensor) -> int:
        return int(feats_PE.shape[0])

    def collate(self, items: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(N, P_max, E) zero-padded features and (N,) valid tokens per item."""
        if not items:
            return torch.zeros(0, 0, self.out_dim), torch.zeros(0, dtype=torch.long)
        lengths_N = torch.tensor([x.shape[0] for x in items], dtype=torch.long)
        batch_NPE = torch.zeros(len(items), int(lengths_N.max()), self.out_dim,
                                dtype=items[0].dtype)
        for i, x_PE in enumerate(items):
            batch_NPE[i, :x_PE.shape[0]] = x_PE
        return batch_NPE, lengths_N
