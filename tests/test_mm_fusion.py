"""Fusion: encoder outputs land exactly in their placeholder runs, any count mismatch raises,
freeze policies, and modality-aware experts (MoMa) route within their group."""

from __future__ import annotations

import pytest
import torch
from test_mm_common import photo_items, speech_items, tiny_encoders  # noqa: F401 (fixtures)

from mmfm.config import ModelConfig
from mmfm.encoders.media import decode_audio, decode_image
from mmfm.encoders.projector import Projector
from mmfm.encoders.registry import default_registry
from mmfm.model.decoder import Decoder
from mmfm.model.fusion import (
    EncoderSlot,
    MediaTensors,
    MultimodalModel,
    PlaceholderMismatchError,
    install_modality_moe,
    placeholder_runs,
)
from mmfm.moe.config import MoEConfig
from mmfm.moe.modality import ModalityExperts, ModalityTrackedMoELayer

IMG, AUD, IS, IE, AS, AE = 2, 3, 4, 5, 6, 7  # the reserved special token ids


def _model(routing: str = "shared", modes=("trainable", "trainable"), unfreeze: int = 0,
           groups=None) -> MultimodalModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=64, max_seq_len=64,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
    decoder = Decoder(cfg)
    install_modality_moe(decoder, routing, groups or {})
    registry = default_registry()
    slots = {}
    for (modality, enc_cfg), mode in zip(tiny_encoders().items(), modes, strict=True):
        enc = registry.build(enc_cfg.kind, cfg=enc_cfg)
        slots[modality] = EncoderSlot(enc, Projector("mlp", enc.out_dim, 32), mode, unfreeze)
    return MultimodalModel(decoder, slots, {"image": IMG, "audio": AUD})


def _media(model, photo_items, speech_items):  # noqa: F811
    """Two images and two clips of different lengths, as the loader would batch them."""
    pre_i = model.slots["image"].encoder.preprocessor
    pre_a = model.slots["audio"].encoder.preprocessor
    imgs = [decode_image(it.data) for it in photo_items[:2]]
    clips = [decode_audio(it.data) for it in speech_items[:2]]
    media = {}
    for name, pre, raws in (("image", pre_i, imgs), ("audio", pre_a, clips)):
        data, lengths = pre.collate([pre.preprocess(r) for r in raws])
        media[name] = MediaTensors(data, lengths, torch.tensor([pre.num_tokens(r) for r in raws]))
    return media


def _ids(media) -> torch.Tensor:
    """Two rows: [text, image run, text, audio run, ...] with the media's token counts."""
    ni = media["image"].num_tokens.tolist()
    na = media["audio"].num_tokens.tolist()
    row0 = [10, IS] + [IMG] * ni[0] + [IE, 11, AS] + [AUD] * na[0] + [AE, 12]
    row1 = [13, AS] + [AUD] * na[1] + [AE, IS] + [IMG] * ni[1] + [IE, 14]
    T = max(len(row0), len(row1))
    return torch.tensor([row0 + [1] * (T - len(row0)), row1 + [1] * (T - len(row1))])


def test_placeholder_runs_are_row_major_and_end_at_rows():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert placeholder_runs(mask) == [2, 1, 2, 1]
    assert placeholder_runs(torch.zeros(2, 3, dtype=torch.bool)) == []


def test_media_embeddings_land_in_their_placeholders(photo_items, speech_items):  # noqa: F811
    model = _model().eval()
    media = _media(model, photo_items, speech_items)
    ids = _ids(media)
    fused = model.embed(ids, media)
    text = model.decoder.embed(ids)
    is_media = (ids == IMG) | (ids == AUD)
    torch.testing.assert_close(fused[~is_media], text[~is_media])
    with torch.no_grad():
        for modality, token in (("image", IMG), ("audio", AUD)):
            feats = model.slots[modality](media[modality], step=0)
            torch.testing.assert_close(fused[ids == token], feats)
            # item by item: the k-th run holds exactly the k-th item's projected tokens
            enc = model.slots[modality].encoder
            row_of_item = [0, 1]
            for k in range(2):
                alone = model.slots[modality].projector(enc(
                    media[modality].data[k:k + 1, ..., :int(media[modality].lengths[k])]
                    if modality == "audio" else media[modality].data[k:k + 1]))[0]
                b = row_of_item[k]
                torch.testing.assert_close(fused[b][ids[b] == token], alone, atol=2e-5, rtol=1e-4)
    out = model(ids, None, media)
    assert out.logits.shape == (2, ids.shape[1], 64)


def test_count_mismatches_raise(photo_items, speech_items):  # noqa: F811
    model = _model().eval()
    media = _media(model, photo_items, speech_items)
    ids = _ids(media)
    short = ids.clone()
    short[0, 2] = 10  # one image placeholder fewer
    with pytest.raises(PlaceholderMismatchError, match="image: input_ids hold 2 placeholder runs"):
        model.embed(short, media)
    one_image = dict(media, image=MediaTensors(media["image"].data[:1], media["image"].lengths[:1],
                                               media["image"].num_tokens[:1]))
    with pytest.raises(PlaceholderMismatchError, match="media batch has 1 items"):
        model.embed(ids, one_image)
    lying = dict(media, audio=MediaTensors(media["audio"].data, media["audio"].lengths,
                                           media["audio"].num_tokens + 1))
    with pytest.raises(PlaceholderMismatchError, match="audio encoder produced"):
        model.embed(ids, lying)
    with pytest.raises(PlaceholderMismatchError, match="image"):
        model.embed(ids, {"audio": media["audio"]})  # placeholders but no items


def test_media_without_an_encoder_raises(photo_items, speech_items):  # noqa: F811
    model = _model()
    media = _media(model, photo_items, speech_items)
    del model.slots["audio"]
    with pytest.raises(PlaceholderMismatchError, match="no audio encoder"):
        model.embed(_ids(media), media)


def test_freeze_policies(photo_items, speech_items):  # noqa: F811
    model = _model(modes=("frozen", "unfreeze_after"), unfreeze=2).train()
    media = _media(model, photo_items, speech_items)
    ids = _ids(media)
    assert not any(p.requires_grad for p in model.slots["image"].encoder.parameters())

    def grads_after_step():
        model.zero_grad(set_to_none=True)
        model(ids, None, media).logits.float().pow(2).mean().backward()
        model.count_micro_batch()
        return {m: any(p.grad is not None for p in model.slots[m].encoder.parameters())
                for m in ("image", "audio")}, model.slots["audio"].projector.net[0].weight.grad

    for step in range(3):
        assert model.train_step == step
        enc_grads, proj_grad = grads_after_step()
        assert enc_grads == {"image": False, "audio": step >= 2}
        assert proj_grad is not None  # projectors always train


def test_modality_experts_route_within_their_group():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=16)
    moe = ModalityExperts(cfg, {"text": 2, "image": 2}, 8, 16)
    x = torch.randn(1, 6, 8)
    ids = torch.tensor([[0, 1, 1, 0, 2, 1]])  # audio has no group: it uses text's
    y, aux = moe(x, ids)
    with torch.no_grad():
        for w in moe.groups["image"].experts.parameters():
            w.mul_(2.0)
    y2, _ = moe(x, ids)
    image = ids[0] == 1
    assert torch.equal(y[0][~image], y2[0][~image]) and not torch.allclose(y[0][image], y2[0][image])
    alone, _ = moe.groups["text"](x[:, ids[0] != 1])
    torch.testing.assert_close(y[0][ids[0] != 1], alone[0])
    assert aux.item() > 0
    moe.compute_metrics(reset=True)
    moe(x, ids)
    metrics = moe.compute_metrics()
    assert int(metrics["image/tokens_per_expert"][0].sum()) == 3
    assert int(metrics["text/tokens_per_expert"][0].sum()) == 3


def test_shared_routing_counts_load_per_modality(photo_items, speech_items):  # noqa: F811
    model = _model("shared").train()
    media = _media(model, photo_items, speech_items)
    ids = _ids(media)
    model(ids, None, media)
    layers = [layer for _, layer in model.moe_layers()]
    assert layers and all(isinstance(layer, ModalityTrackedMoELayer) for layer in layers)
    metrics = layers[0].compute_metrics()
    for modality, token in (("image", IMG), ("audio", AUD)):
        assert int(metrics[f"{modality}/tokens_per_expert"][0].sum()) == 2 * int((ids == token).sum())
    assert int(metrics["text/tokens_per_expert"][0].sum()) == 2 * int(
        ((ids != IMG) & (ids != AUD)).sum())


def test_moma_model_trains_each_group(photo_items, speech_items):  # noqa: F811
    model = _model("modality", groups={"text": 2, "image": 2, "audio": 2}).train()
    media = _media(model, photo_items, speech_items)
    model(_ids(media), None, media).logits.float().pow(2).mean().backward()
    ffn = model.decoder.blocks[0].ffn
    assert isinstance(ffn, ModalityExperts)
    assert all(p.grad is not None for g in ffn.groups.values() for p in g.experts.parameters())
