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
        self.model: MultimodalModel | None = None  # kept for the feature-cache fingerprints

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
        self.model = MultimodalModel(decoder, slots, {"image": ids[IMAGE], "audio": ids[AUDIO]},
                                     grad_accum=self.cfg.train.grad_accum)
        return self.model

    def feature_fingerprints(self) -> dict[str, str]:
        """{modality: fingerprint} of the frozen encoders of the built model, whose feature
        caches the loaders read when present (`multimodal.feature_cache`)."""
        if self.model is None or not self.mm.feature_cache:
            return {}
        dirs = [d for s in self.mm.sources.values() for d in (s.train, s.val) if d]
        # Hash weights only where a cache exists: hashing a large tower is not free, and a
        # sharded (FSDP) tower gathers its weights to hash them.
        return {m: slot.fingerprint() for m, slot in self.model.slots.items()
                if slot.train_mode == "frozen"
                and any(read_cache_index(d, m) is not None for d in dirs)}

    def train_loader(self, rank: int = 0, world_size: int = 1) -> MMLoader:
        """The training loader, after checking the sources, tokenizer and validation data."""
        dcfg = self.cfg.data
        sources = [(name, s.train, s.weight) for name, s in self.mm.sources.items()]
        self.loader = MMLoader(
            sources, dcfg.tokenizer, dcfg.seq_len, self.cfg.train.micro_batch_size,
            self.mm.encoders(), rank=rank, world_size=world_size, num_workers=dcfg.num_workers,
            seed=self.cfg.run.seed, shuffle_buffer=self.mm.shuffle_buffer, strict=self.mm.strict,
            loss_on_markers=self.mm.loss_on_markers, vocab_size=self.cfg.model.vocab_size,
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
                                    features=self.feature_fingerprints())

    def loss(self, model: nn.Module, batch: MMBatch) -> LossOutput:
        """Mean next-token loss over text targets, plus `loss/<group>` and `targets/<group>`
        for each target group present, media counts and skipped-sample counts."""
        doc_ids = batch.doc_ids if self.cfg.data.document_mask else None
        out = model(batch.input_ids, doc_ids, batch.media, labels_BT=batch.labels)
        if model.training:
            model.count_micro_batch()
        target_BT = batch.labels != IGNORE_INDEX
        return LossOutput(out.lm_loss, out.aux_loss, int(target_BT.sum()),
                          self._metrics(out.token_loss_BT, target_BT, batch))

    def _metrics(self, ce_BT: torch.Tensor, target_BT: torch.Tensor,
                 batch: MMBatch) -> dict[str, float]:
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
        if self.loader is not None:
            for reason, n in self.loader.skipped.items():
                metrics[f"data/skipped_{reason}"] = float(n)
        return metrics


# ----------------------------------------------------------------------------- demo

DEMO_PRESET = "configs/mm_moe_tiny.yaml"
DEMO_RECIPE = "configs/data/mm_demo.yaml"
DEMO_STEPS = 60  # ~40 s on two idle cores; the loss falls from ~9 to ~4.5


@torch.no_grad()
def loss_by_group(task: MultimodalTask, model: nn.Module) -> dict[str, float]:
    """Held-out loss per target group (text / after an image / after audio), target-weighted
    over `task.eval_batches()`."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for batch in task.eval_batches():
        metrics = task.loss(model, batch).metrics
        for name in MODALITIES:
            n = metrics.get(f"targets/{name}", 0.0)
            sums[name] = sums.get(name, 0.0) + metrics.get(f"loss/{name}", 0.0) * n
            counts[name] = counts.get(name, 0.0) + n
    return {name: sums[name] / counts[name] for name in sums if counts[name]}


def run_multimodal_demo(out_dir: str = "runs/demo", tokenizer: str | None = None,
                        steps: int | None = None, root: str | None = None) -> int:
    """`make demo`'s multimodal part: real media -> shard sets -> train the tiny MoMa preset
    through the generic Trainer -> held-out loss per modality. Shard sets whose media could
    not be fetched are left out of the mixture (and said so)."""
    import time
    from pathlib import Path

    from mmfm.config import load_config
    from mmfm.data.mm_build import build_mm_shards, load_recipe
    from mmfm.train.trainer import Trainer

    out = Path(out_dir)
    repo = Path(__file__).resolve().parents[2]  # configs/ is not installed: the checkout's
    root_dir = Path(root) if root else (repo if (repo / DEMO_PRESET).is_file() else Path.cwd())
    shards = out / "mm" / "shards"
    started = time.perf_counter()
    if not (shards / "manifest.json").is_file():
        print(f"[demo] multimodal shards: {DEMO_RECIPE} -> {shards}", flush=True)
        recipe = load_recipe(root_dir / DEMO_RECIPE, [f"out={shards}",
                                                     f"cache={out / 'cache' / 'media'}"])
        build_mm_shards(recipe, log=lambda line: print(f"[demo] {line.strip()}", flush=True))
    cfg = load_config(root_dir / DEMO_PRESET, _demo_overrides(out, tokenizer, steps or DEMO_STEPS))
    _keep_written_sets(cfg, shards)
    print(f"[demo] multimodal train: {cfg.train.steps} steps, sources "
          f"{ {n: s.weight for n, s in cfg.multimodal.sources.items()} }, routing "
          f"{cfg.multimodal.moe_routing} {dict(cfg.multimodal.modality_experts)}", flush=True)
    trainer = Trainer(cfg)
    result = trainer.fit()
    losses = list(result.train_losses.values())
    k = min(10, len(losses))
    print(f"[demo] multimodal train loss {sum(losses[:k]) / k:.3f} (first {k} steps) -> "
          f"{sum(losses[-k:]) / k:.3f} (last {k}); validation loss {result.val_loss:.4f}")
    by_group = loss_by_group(trainer.task, trainer.model)
    print("[demo] held-out loss by target: " + ", ".join(
        f"{_GROUP_LABELS[g]} {v:.3f}" for g, v in by_group.items()))
    print(f"[demo] multimodal run: {result.run_dir} ({time.perf_counter() - started:.0f}s "
          "with media fetch and shards)")
    return 0


_GROUP_LABELS = {"text": "plain text", "image": "captions (after an image)",
                 "audio": "transcripts (after audio)"}


def _demo_overrides(out, tokenizer: str | None, steps: int | None) -> list[str]:
    shards = out / "mm" / "shards"
    overrides = [f"run.out_dir={out}", "run.name=mm_moe_tiny",
                 f"data.tokenizer={tokenizer or out / 'data' / 'tokenizer.json'}"]
    for name in ("images", "speech", "spoken_stamps"):
        overrides += [f"multimodal.sources.{name}.train={shards / name / 'train'}",
                      f"multimodal.sources.{name}.val={shards / name / 'val'}"]
    if steps is not None:
        overrides += [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                      f"train.eval_every={steps}", f"train.ckpt_every={steps}",
                      f"train.log_every={max(1, min(10, steps // 2))}"]
    return overrides


def _keep_written_sets(cfg, shards) -> None:
    """Drop sources whose shards were not written (their media were unavailable)."""
    for name in list(cfg.multimodal.sources):
        if not (shards / name / "train" / "index.json").is_file():
            print(f"[demo] shard set {name} was not written (media unavailable): left out")
            del cfg.multimodal.sources[name]
        elif not (shards / name / "val" / "index.json").is_file():
            cfg.multimodal.sources[name].val = None
    if not cfg.multimodal.sources:
        raise UserValueError(f"no multimodal shard set could be written under {shards}")
    cfg.validate()
