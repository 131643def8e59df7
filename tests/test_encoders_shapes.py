"""Encoders: output shapes, token counts for variable-length inputs, batch independence,
local-only pretrained weights, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_mm_common import photo_items, speech_items  # noqa: F401 (fixtures)

from mmfm.encoders import EncoderConfig, ModalityEncoder, default_registry
from mmfm.encoders.audio import resampled_length
from mmfm.encoders.media import MediaError, Waveform, decode_audio, decode_image
from mmfm.encoders.projector import Projector


def _image_cfg(kind: str, **kw) -> EncoderConfig:
    return EncoderConfig(kind=kind, width=32, layers=1, heads=2, image_size=48, patch_size=16, **kw)


@pytest.mark.parametrize("kind", ["patch", "openclip"])
def test_image_encoders_give_one_token_per_patch(kind, photo_items):  # noqa: F811
    enc = default_registry().build(kind, cfg=_image_cfg(kind)).eval()
    assert isinstance(enc, ModalityEncoder) and enc.modality == "image"
    picked = [i for i in photo_items if i.name in ("astronaut", "cat", "grace_hopper")]
    images = [decode_image(it.data) for it in picked]  # different sizes, gray and color
    assert len({im.size for im in images}) > 1
    x = [enc.preprocess(im) for im in images]
    assert all(t.shape == (3, 48, 48) for t in x)
    batch, lengths = enc.preprocessor.collate(x)
    out = enc(batch, lengths)
    assert out.shape == (3, 9, 32) and all(enc.num_tokens(im) == 9 for im in images)
    assert enc.output_lengths(lengths).tolist() == [9, 9, 9]
    torch.testing.assert_close(enc(batch[1:2]), out[1:2], atol=1e-5, rtol=1e-5)


def test_openclip_named_config_geometry():
    from mmfm.encoders.image import ImagePreprocessor

    pre = ImagePreprocessor(EncoderConfig(kind="openclip", openclip_model="ViT-B-32"))
    assert (pre.image_size, pre.tokens) == (224, 49)
    with pytest.raises(ValueError, match="no model config"):
        ImagePreprocessor(EncoderConfig(kind="openclip", openclip_model="not-a-model"))


def test_openclip_loads_weights_only_from_a_local_file(tmp_path, photo_items):  # noqa: F811
    from safetensors.torch import save_file

    registry = default_registry()
    source = registry.build("openclip", cfg=_image_cfg("openclip")).eval()
    full_ckpt = {f"visual.{k}": v for k, v in source.visual.state_dict().items()}
    torch.save({"state_dict": full_ckpt}, tmp_path / "clip.pt")  # open_clip checkpoint layout
    save_file({k: v.contiguous() for k, v in source.visual.state_dict().items()},
              str(tmp_path / "tower.safetensors"))
    x = source.preprocess(decode_image(photo_items[0].data))[None]
    for path in ("clip.pt", "tower.safetensors"):
        cfg = _image_cfg("openclip", pretrained_path=str(tmp_path / path))
        loaded = registry.build("openclip", cfg=cfg).eval()
        torch.testing.assert_close(loaded(x), source(x))
    with pytest.raises(ValueError, match="not a local file"):
        registry.build("openclip", cfg=_image_cfg("openclip", pretrained_path="laion2b_s34b_b79k"))
    with pytest.raises(ValueError, match="do not fit"):
        torch.save({"visual.bogus": torch.zeros(1)}, tmp_path / "bad.pt")
        registry.build("openclip", cfg=_image_cfg("openclip", pretrained_path=str(tmp_path / "bad.pt")))


def _audio_cfg(**kw) -> EncoderConfig:
    return EncoderConfig(kind="whisper", width=32, layers=1, heads=2, n_mels=40, **kw)


@pytest.mark.parametrize("subsample", [1, 4, 8])
def test_audio_tokens_follow_duration(subsample, speech_items):  # noqa: F811
    enc = default_registry().build("whisper", cfg=_audio_cfg(subsample=subsample)).eval()
    clips = [decode_audio(it.data) for it in speech_items[:4]]
    assert len({len(c.samples) for c in clips}) == 4 and clips[0].sample_rate == 8000
    feats = [enc.preprocess(c) for c in clips]
    batch, frames = enc.preprocessor.collate(feats)
    out = enc(batch, frames)
    tokens = [enc.num_tokens(c) for c in clips]
    assert enc.output_lengths(frames).tolist() == tokens and out.shape == (4, max(tokens), 32)
    for c, n in zip(clips, tokens, strict=True):  # ~100 frames per second at 16 kHz
        expected = 1 + min(resampled_length(len(c.samples), 8000, 16000), 8 * 16000) // 160
        assert n == -(-expected // subsample) if subsample > 1 else n == expected
    for i, f in enumerate(feats):  # a clip's embeddings do not depend on its batch mates
        alone = enc(f[None])
        torch.testing.assert_close(alone[0], out[i, :tokens[i]], atol=2e-5, rtol=1e-4)


def test_audio_resampling_mono_and_clipping():
    pre = default_registry().build("whisper", cfg=_audio_cfg(max_seconds=1.0)).preprocessor
    rng = np.random.default_rng(0)
    stereo_as_mono = Waveform(rng.standard_normal(44100 * 2).astype(np.float32) * 0.1, 44100)
    feats = pre.preprocess(stereo_as_mono)
    assert feats.shape == (40, 101)  # clipped to 1 s at 16 kHz, hop 160
    assert pre.num_tokens(stereo_as_mono) == 26  # 101 frames / 4, rounded up
    assert resampled_length(12345, 8000, 16000) == 24690
    assert resampled_length(10, 44100, 16000) == 4  # ceil(3.63)


def test_media_decoding_errors():
    with pytest.raises(MediaError, match="undecodable image"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(MediaError, match="undecodable audio"):
        decode_audio(b"fLaC" + bytes(range(200)))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector_maps_to_decoder_width(kind):
    proj = Projector(kind, 32, 48)
    assert proj(torch.randn(2, 5, 32)).shape == (2, 5, 48)
    with pytest.raises(ValueError, match="projector kind"):
        Projector("conv", 32, 48)


def test_registry_names_and_unknown():
    registry = default_registry()
    assert registry.names() == ["openclip", "patch", "whisper"]
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        registry.build("vit", cfg=_image_cfg("patch"))
