"""Early fusion: token embeddings with encoder outputs scattered into placeholder positions.

Shape legend: B batch, T sequence, D decoder width, N media items of one modality,
L padded item length (pixels or mel frames), P encoder output tokens (max over items),
E encoder width.

Every media item occupies one contiguous run of its modality's placeholder token
(`<|image|>` or `<|audio|>`) in `input_ids`, runs in row-major order matching the order of
items in the media batch. :func:`scatter_media` checks that the run lengths equal the
items' token counts, one by one, and raises `PlaceholderMismatchError` on any difference:
embeddings never silently shift to the wrong positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmfm.encoders.features import FeatureCacheError
from mmfm.encoders.media import MODALITY_IDS, MediaTensors
from mmfm.errors import UserValueError
from mmfm.model.decoder import Decoder, DecoderOutput
from mmfm.model.layers import output_std

__all__ = ["MODALITY_IDS", "EncoderSlot", "FeatureCacheError", "MediaTensors", "MultimodalModel",
           "PlaceholderMismatchError", "fuse_media", "install_modality_moe", "modality_ids_of",
           "placeholder_runs", "scatter_media"]


class PlaceholderMismatchError(UserValueError):
    """Placeholder runs in the token ids do not match the media items' token counts."""


class EncoderSlot(nn.Module):
    """One modality's encoder, its projector to the decoder width and its freeze policy:
    `trainable`, `frozen` (never updated) or `unfreeze_after` N optimizer steps."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, train_mode: str = "trainable",
                 unfreeze_after_steps: int = 0, encoder_cfg: Any = None) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.train_mode, self.unfreeze_after_steps = train_mode, unfreeze_after_steps
        self.encoder_cfg = encoder_cfg  # its EncoderConfig: part of the feature fingerprint
        self._fingerprint: str | None = None
        if train_mode == "frozen":
            self.encoder.requires_grad_(False)  # kept out of the optimizer altogether

    def encoder_frozen(self, step: int) -> bool:
        return self.train_mode == "frozen" or (
            self.train_mode == "unfreeze_after" and step < self.unfreeze_after_steps)

    def forward(self, media: MediaTensors, step: int) -> Tensor:
        """(sum of the items' token counts, D): each item's valid tokens, items in order.
        Media that hold cached encoder outputs (`media.fingerprint` set) skip the encoder."""
        if media.fingerprint is not None:
            out_NPE, out_N = self._cached(media), media.lengths
        else:
            out_NPE = self._encode(media, step)
            out_N = self.encoder.output_lengths(media.lengths.to(out_NPE.device))
        if not torch.equal(out_N.cpu(), media.num_tokens.cpu()):
            raise PlaceholderMismatchError(
                f"{self.encoder.modality} encoder produced {out_N.tolist()} tokens per item but "
                f"the batch reserved {media.num_tokens.tolist()} placeholders")
        valid_NP = torch.arange(out_NPE.shape[1], device=out_NPE.device)[None] < out_N[:, None]
        return self.projector(out_NPE[valid_NP])

    def _encode(self, media: MediaTensors, step: int) -> Tensor:
        frozen = self.encoder_frozen(step)
        if frozen:
            self.encoder.eval()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.encoder(media.data, media.lengths)

    def _cached(self, media: MediaTensors) -> Tensor:
        """The cached outputs, after checking they were made by this (frozen) encoder."""
        modality = self.encoder.modality
        if self.train_mode != "frozen":
            raise FeatureCacheError(f"{modality}: cached encoder features given to an encoder "
                                    f"with train_mode={self.train_mode!r}; only frozen encoders "
                                    "can use a feature cache")
        if media.fingerprint != self.fingerprint():
            raise FeatureCacheError(
                f"{modality}: the batch holds features of encoder {media.fingerprint[:12]} but "
                f"the model's encoder is {self.fingerprint()[:12]}: the feature cache is stale; "
                "re-run `mmfm data encode` with this run's config")
        return media.data

    def fingerprint(self) -> str:
        """Fingerprint of the encoder's weights and preprocessing (computed once: the encoder
        is frozen, and weights are loaded before the first step)."""
        if self._fingerprint is None:
            from mmfm.encoders.features import encoder_fingerprint

            self._fingerprint = encoder_fingerprint(self.encoder, self.encoder_cfg)
        return self._fingerprint


def run_starts(mask_BT: Tensor) -> Tensor:
    """(B, T) bool: where a maximal run of True in `mask_BT` starts (runs end at row ends)."""
    prev_BT = torch.zeros_like(mask_BT)
    prev_BT[:, 1:] = mask_BT[:, :-1]
    return mask_BT & ~prev_BT


def placeholder_runs(mask_BT: Tensor) -> list[int]:
    """Lengths of the maximal runs of True in `mask_BT`, row-major; runs end at row ends."""
    starts = run_starts(mask_BT).flatten()
    run_id = torch.cumsum(starts.long(), 0) - 1
    return torch.bincount(run_id[mask_BT.flatten()], minlength=int(starts.sum())).tolist()


def scatter_media(embeds_BTD: Tensor, input_ids_BT: Tensor, placeholder_id: int,
                  feats_ND: Tensor, num_tokens: list[int], modality: str) -> Tensor:
    """`embeds_BTD` with the placeholder positions replaced by `feats_ND` (items' tokens in
    order), after checking each placeholder run against each item's token count."""
    mask_BT = input_ids_BT == placeholder_id
    runs = placeholder_runs(mask_BT)
    if runs != num_tokens:
        first = next((i for i, (r, n) in enumerate(zip(runs, num_tokens, strict=False))
                      if r != n),
                     min(len(runs), len(num_tokens)))
        raise PlaceholderMismatchError(
            f"{modality}: input_ids hold {len(runs)} placeholder runs ({sum(runs)} tokens) but "
            f"the media batch has {len(num_tokens)} items ({sum(num_tokens)} embeddings); first "
            f"difference at item {first}: run {runs[first] if first < len(runs) else None} vs "
            f"item {num_tokens[first] if first < len(num_tokens) else None} tokens")
    if feats_ND.shape[0] != sum(num_tokens):
        raise PlaceholderMismatchError(
            f"{modality}: {feats_ND.shape[0]} embeddings for {sum(num_tokens)} placeholders")
    return embeds_BTD.masked_scatter(mask_BT[..., None], feats_ND.to(embeds_BTD.dtype))


def modality_ids_of(input_ids_BT: Tensor, placeholder_ids: dict[str, int]) -> Tensor:
    """(B, T) int64: 0 for text tokens, 1/2 at image/audio placeholders."""
    ids_BT = torch.zeros_like(input_ids_BT)
    for modality, token in placeholder_ids.items():
        ids_BT = ids_BT.masked_fill(input_ids_BT == token, MODALITY_IDS[modality])
    return ids_BT


def fuse_media(embeds_BTD: Tensor, input_ids_BT: Tensor, media: dict[str, MediaTensors] | None,
               slots: nn.ModuleDict, placeholder_ids: dict[str, int], step: int) -> Tensor:
    """Token embeddings `embeds_BTD` with each modality's encoded, projected media scattered
    into its placeholders (`step`: optimizer steps so far, for unfreeze-after-N). Shared by
    `MultimodalModel` and the first pipeline stage (`mmfm.parallel.mm_pipeline`)."""
    media = media or {}
    for modality, token in placeholder_ids.items():
        items = media.get(modality)
        count = 0 if items is None else len(items)
        if modality not in slots:
            if count or bool((input_ids_BT == token).any()):
                raise PlaceholderMismatchError(f"batch holds {modality} but the model has "
                                               f"no {modality} encoder configured")
            continue
        if count == 0:
            feats_ND = embeds_BTD.new_zeros(0, embeds_BTD.shape[-1])
            num_tokens: list[int] = []
        else:
            feats_ND = slots[modality](items, step)
            num_tokens = items.num_tokens.tolist()
        embeds_BTD = scatter_media(embeds_BTD, input_ids_BT, token, feats_ND, num_tokens,
                                   modality)
    return embeds_BTD


class MultimodalModel(nn.Module):
    """Decoder + modality encoders: embed tokens, encode and project media, scatter them into
    their placeholders, run the decoder on the fused embeddings."""

    def __init__(self, decoder: Decoder, slots: dict[str, EncoderSlot],
                 placeholder_ids: dict[str, int], grad_accum: int = 1) -> None:
        super().__init__()
        missing = sorted(set(slots) - set(placeholder_ids))
        if missing:
            raise UserValueError(f"no placeholder token id for modalities {missing}")
        self.decoder = decoder
        self.slots = nn.ModuleDict(slots)
        self.placeholder_ids = dict(placeholder_ids)
        self.grad_accum = grad_accum
        # Training micro batches seen (counted by the task; checkpointed), so encoders know
        # the optimizer step for unfreeze-after-N.
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.int64))

    @property
    def train_step(self) -> int:
        """Optimizer steps taken so far."""
        return int(self.micro_batches) // self.grad_accum

    def count_micro_batch(self) -> None:
        self.micro_batches += 1

    def modality_ids(self, input_ids_BT: Tensor) -> Tensor:
        """(B, T) int64: 0 for text tokens, 1/2 at image/audio placeholders."""
        return modality_ids_of(input_ids_BT, self.placeholder_ids)

    def embed(self, input_ids_BT: Tensor, media: dict[str, MediaTensors] | None) -> Tensor:
        """(B, T, D) token embeddings with every modality's media scattered in."""
        return fuse_media(self.decoder.embed(input_ids_BT), input_ids_BT, media, self.slots,
                          self.placeholder_ids, self.train_step)

    def forward(self, input_ids_BT: Tensor, doc_ids_BT: Tensor | None = None,
                media: dict[str, MediaTensors] | None = None,
                labels_BT: Tensor | None = None) -> DecoderOutput:
        """The decoder's output (and loss, given labels) on text and media embeddings."""
        embeds_BTD = self.embed(input_ids_BT, media)
        return self.decoder(input_ids_BT, doc_ids_BT, inputs_embeds_BTD=embeds_BTD,
                            modality_ids_BT=self.modality_ids(input_ids_BT), labels_BT=labels_BT)

    def moe_layers(self):
        """The decoder's MoE layers (for load metrics and aux-loss-free bias updates)."""
        return self.decoder.moe_layers()


def install_modality_moe(decoder: Decoder, routing: str, groups: dict[str, int]) -> None:
    """Replace the decoder's MoE FFNs by modality-aware ones: `shared` keeps one router and
    counts load per modality; `modality` gives each modality its own expert group (MoMa).
    Re-initializes those FFNs exactly as the decoder initializes MoE layers."""
    from mmfm.moe.modality import ModalityExperts, ModalityTrackedMoELayer

    cfg = decoder.cfg
    if cfg.moe is None:
        if routing == "modality":
            raise UserValueError("multimodal.moe_routing=modality needs an MoE model")
        return
    for block in decoder.blocks:
        if not block.is_moe:
            continue
        if routing == "modality":
            ffn = ModalityExperts(cfg.moe, groups, cfg.d_model, cfg.ffn_hidden, cfg.init_std)
        else:
            ffn = ModalityTrackedMoELayer(cfg.moe, cfg.d_model, cfg.ffn_hidden, init_std=cfg.init_std)
        ffn.reset_parameters(output_std(cfg.init_std, cfg.n_layers))
        block.ffn = ffn
