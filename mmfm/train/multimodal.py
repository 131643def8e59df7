"""The interleaved multimodal job as a `Task`: model = decoder + encoders (fusion), data =
multimodal shard sets (mixture), loss = next-token loss on text targets with a breakdown
by target group (text, image-conditioned text, audio-conditioned text).

Shape legend: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from mmfm.data.mm_features import read_cache_index
from mmfm.data.mm_loader import MMLoader, iter_mm_eval_batches
from mmfm.data.mm_pack import IGNORE_INDEX, MMBatch
from mmfm.data.shards import check_disjoint_splits
from mmfm.data.tokenizer import AUDIO, IMAGE, load_tokenizer, special_token_ids
from mmfm.encoders.config import MODALITIES
from mmfm.encoders.projector import Projector
from mmfm.encoders.registry import default_registry
from mmfm.errors import UserValueError
from mmfm.model.decoder import Decoder
from mmfm.model.fusion import EncoderSlot, MultimodalModel, install_modality_moe
from mmfm.train.task import LossOutput


class MultimodalTask:
    """Interleaved text/image/audio pretraining (``data.kind=multimodal``)."""

    def __init__(self, cfg) -> None:
        if cfg.multimodal is None:
            raise UserValueError("data.kind=multimodal needs a multimodal: section")
        self.cfg, self.mm = cfg, cfg.multimodal
        self.loader: MMLoader | None = None
        # The encoder slots of the built model, for the feature-cache fingerprints. Only the
        # slots: a pipeline rank drops the decoder layers it does not hold, and a reference
        # to the whole model here would keep them alive.
        self.slots: dict[str, EncoderSlot] = {}

    def build_model(self) -> MultimodalModel:
        """Decoder (with modality-aware MoE FFNs) + one encoder slot per configured modality."""
        model_cfg = self.cfg.model
        decoder = Decoder(model_cfg)
        install_modality_moe(decoder, self.mm.moe_routing, dict(self.mm.modality_experts))
        registry = default_registry()
        slots = {}
        for modality, enc_cfg in self.mm.encoders().items():
            encoder = registry.build(enc_cfg.kind, cfg=enc_cfg)
            projector = Projector(enc_cfg.projector, encoder.out_dim, model_cfg.d_model)
            slots[modality] = EncoderSlot(encoder, projector, enc_cfg.train_mode,
                                          enc_cfg.unfreeze_after_steps, enc_cfg)
        ids = special_token_ids(load_tokenizer(self.cfg.data.tokenizer))
        self.slots = dict(slots)
        return MultimodalModel(decoder, slots, {"image": ids[IMAGE], "audio": ids[AUDIO]},
                               grad_accum=self.cfg.train.grad_accum)

    def feature_fingerprints(self) -> dict[str, str]:
        """{modality: fingerprint} of the frozen encoders of the built model, whose feature
        caches the loaders read when present (`multimodal.feature_cache`)."""
        if not self.slots or not self.mm.feature_cache:
            return {}
        dirs = [d for s in self.mm.sources.values() for d in (s.train, s.val) if d]
        # Hash weights only where a cache exists: hashing a large tower is not free, and a
        # sharded (FSDP) tower gathers its weights to hash them.
        return {m: slot.fingerprint() for m, slot in self.slots.items()
                if slot.train_mode == "frozen"
                and any(read_cache_index(d, m) is not None for d in dirs)}

    def train_loader(self, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> MMLoader:
        """The training loader, after checking the sources, tokenizer and validation data."""
        dcfg = self.cfg.data
        sources = [(name, s.train, s.weight) for name, s in self.mm.sources.items()]
        for name, src in self.mm.sources.items():
            if src.val:
                check_disjoint_splits(src.train, src.val, f"multimodal.sources.{name}")
        self.loader = MMLoader(
            sources, dcfg.tokenizer, dcfg.seq_len, self.cfg.train.micro_batch_size,
            self.mm.encoders(), rank=rank, world_size=world_size, num_workers=dcfg.num_workers,
            seed=self.cfg.run.seed, shuffle_buffer=self.mm.shuffle_buffer, strict=self.mm.strict,
            loss_on_markers=self.mm.loss_on_markers, vocab_size=self.cfg.model.vocab_size,
            pin_memory=pin_memory, max_image_pixels=self.mm.max_image_pixels,
            features=self.feature_fingerprints(), mixture=self.mm.mixture)
        next(self._eval_iter(1), None)
        return self.loader

    def eval_batches(self) -> Iterator[MMBatch]:
        return self._eval_iter(self.cfg.train.eval_batches)

    def _eval_iter(self, max_batches: int) -> Iterator[MMBatch]:
        val = [(name, s.val) for name, s in self.mm.sources.items() if s.val]
        if not val:
            raise UserValueError("no validation data: set multimodal.sources[*].val")
        return iter_mm_eval_batches(val, self.cfg.data.tokenizer, self.cfg.data.seq_len,
                                    self.cfg.train.micro_batch_size, self.mm.encoders(),
                                    max_batches, strict=self.mm.strict,
                                    loss_on_markers=self.mm.loss_on_markers,
                                    max_image_pixels=self.mm.max_image_pixels,
                                    features=self.feature_fingerprints())

    def loss(self, model: nn.Module, batch: MMBatch) -> LossOutput:
        """Mean next-token loss over text targets, plus `loss/<group>` and `targets/<group>`
        for each target group present, media counts and skipped-sample counts."""
        skipped = self.loader.skipped if self.loader is not None else {}
        return multimodal_loss(model, batch, self.cfg.data.document_mask, skipped)

    def token_loss_metrics(self, batch: MMBatch, token_loss_BT: torch.Tensor) -> dict[str, float]:
        """`loss`'s metrics from per-token losses the model computed elsewhere (the last
        pipeline stage records them; see `mmfm.parallel.mm_pipeline`)."""
        skipped = self.loader.skipped if self.loader is not None else {}
        return group_metrics(token_loss_BT, batch.labels != IGNORE_INDEX, batch, skipped)


def multimodal_loss(model: nn.Module, batch: MMBatch, document_mask: bool,
                    skipped: dict[str, int] | None = None) -> LossOutput:
    """The multimodal task's loss on one micro-batch (also the parity harness's): the model's
    LM and aux losses, and the per-target-group metrics (`loss/<group>`, `targets/<group>`,
    media counts, the loader's `skipped` sample counts). Counts the micro-batch for the
    encoders' unfreeze schedule when training."""
    doc_ids = batch.doc_ids if document_mask else None
    out = model(batch.input_ids, doc_ids, batch.media, labels_BT=batch.labels)
    if model.training:
        model.count_micro_batch()
    target_BT = batch.labels != IGNORE_INDEX
    return LossOutput(out.lm_loss, out.aux_loss, int(target_BT.sum()),
                      group_metrics(out.token_loss_BT, target_BT, batch, skipped or {}),
                      token_loss_BT=out.token_loss_BT)


def group_metrics(ce_BT: torch.Tensor, target_BT: torch.Tensor, batch: MMBatch,
                  skipped: dict[str, int]) -> dict[str, float]:
    """Per-target-group mean loss and target count, media counts, skipped samples."""
    metrics: dict[str, float] = {}
    for g, name in enumerate(MODALITIES):
        mask_BT = target_BT & (batch.target_groups == g)
        count = int(mask_BT.sum())
        if count:
            metrics[f"loss/{name}"] = float(ce_BT.detach()[mask_BT].mean())
            metrics[f"targets/{name}"] = float(count)
    for modality, items in batch.media.items():
        metrics[f"media/{modality}_items"] = float(len(items))
        metrics[f"media/{modality}_tokens"] = float(items.num_tokens.sum())
    for reason, n in skipped.items():
        metrics[f"data/skipped_{reason}"] = float(n)
    return metrics
