"""Image encoders: an OpenCLIP vision tower and a from-scratch patch embedding.

Shape legend: N images, C=3 channels, S image side, G = S / patch grid side, P = G*G
tokens per image, W encoder width.

Both turn a batch of preprocessed images (N, 3, S, S) into (N, P, W) patch embeddings; the
fusion model projects them to the decoder width and scatters them into the P `<|image|>`
placeholders of each image. Preprocessing (decode-side, run in loader workers) needs only
the config, not the weights: :class:`ImagePreprocessor`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from mmfm.encoders.config import EncoderConfig
from mmfm.errors import UserValueError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImagePreprocessor:
    """PIL image -> normalized (3, S, S) float tensor; a fixed number of tokens per image."""

    modality = "image"

    def __init__(self, cfg: EncoderConfig) -> None:
        import open_clip

        self.image_size, patch = _vision_geometry(cfg)
        self.tokens = (self.image_size // patch) ** 2
        mean, std = (CLIP_MEAN, CLIP_STD) if cfg.kind == "openclip" else ((0.5,) * 3, (0.5,) * 3)
        # OpenCLIP's own eval transform: resize the short side, center crop, normalize.
        self.transform = open_clip.image_transform(self.image_size, is_train=False,
                                                   mean=mean, std=std)

    def preprocess(self, raw: Image.Image) -> Tensor:
        return self.transform(raw.convert("RGB"))

    def num_tokens(self, raw: Image.Image | Tensor) -> int:
        return self.tokens

    def collate(self, items: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(N, 3, S, S) batch and (N,) token counts."""
        if not items:
            return torch.zeros(0, 3, self.image_size, self.image_size), torch.zeros(0, dtype=torch.long)
        return torch.stack(items), torch.full((len(items),), self.tokens, dtype=torch.long)


def _vision_geometry(cfg: EncoderConfig) -> tuple[int, int]:
    """(image side, patch size) of the tower `cfg` describes."""
    if cfg.kind == "openclip" and cfg.openclip_model:
        vision = _named_vision_cfg(cfg.openclip_model)
        if "patch_size" not in vision:
            raise UserValueError(f"open_clip model {cfg.openclip_model!r} is not a ViT with patches; "
                             "use a ViT config (e.g. ViT-B-32)")
        size = vision.get("image_size", 224)
        return (size if isinstance(size, int) else size[0]), vision["patch_size"]
    return cfg.image_size, cfg.patch_size


def _named_vision_cfg(name: str) -> dict:
    import open_clip

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise UserValueError(f"open_clip has no model config {name!r}; see open_clip.list_models()")
    return dict(model_cfg["vision_cfg"])


class _TransformerStack(nn.Module):
    """Pre-norm transformer encoder layers with an optional key padding mask."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x_NTW: Tensor, pad_NT: Tensor | None = None) -> Tensor:
        return self.norm(self.layers(x_NTW, src_key_padding_mask=pad_NT))


class _FixedTokenImage:
    """Preprocessing and token counts shared by the image encoders: every image is resized to
    one square and gives the same number of patch tokens."""

    preprocessor: ImagePreprocessor

    def preprocess(self, raw: Image.Image) -> Tensor:
        return self.preprocessor.preprocess(raw)

    def num_tokens(self, raw: Image.Image | Tensor) -> int:
        return self.preprocessor.tokens

    def output_lengths(self, lengths_N: Tensor) -> Tensor:
        return torch.full_like(lengths_N, self.preprocessor.tokens)


class PatchEmbedEncoder(_FixedTokenImage, nn.Module):
    """Fuyu/Chameleon-style early fusion without a pretrained tower: non-overlapping patches,
    a linear patch embedding, learned positions and a few transformer layers, all trained
    from scratch with the decoder."""

    modality = "image"

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.preprocessor = ImagePreprocessor(cfg)
        self.out_dim = cfg.width
        grid = cfg.image_size // cfg.patch_size
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_PW = nn.Parameter(torch.randn(grid * grid, cfg.width) * 0.02)
        self.body = _TransformerStack(cfg.width, cfg.layers, cfg.heads)

    def forward(self, images_NCSS: Tensor, lengths_N: Tensor | None = None) -> Tensor:
        x_NWGG = self.patch(images_NCSS)
        x_NPW = x_NWGG.flatten(2).transpose(1, 2) + self.pos_PW
        return self.body(x_NPW)


class OpenCLIPImageEncoder(_FixedTokenImage, nn.Module):
    """An OpenCLIP ViT vision tower (any open_clip ViT config, or a tiny custom one), returning
    its patch tokens after the final LayerNorm. Weights come only from a local file."""

    modality = "image"

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        self.preprocessor = ImagePreprocessor(cfg)
        vision = _named_vision_cfg(cfg.openclip_model) if cfg.openclip_model else {
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width,
            "layers": cfg.layers, "head_width": cfg.width // cfg.heads}
        vision_cfg = CLIPVisionCfg(**{**vision, "output_tokens": True})
        self.visual = _build_vision_tower(embed_dim=vision_cfg.width, vision_cfg=vision_cfg)
        self.out_dim = vision_cfg.width
        if cfg.pretrained_path:
            load_local_vision_weights(self.visual, cfg.pretrained_path)

    def forward(self, images_NCSS: Tensor, lengths_N: Tensor | None = None) -> Tensor:
        _, tokens_NPW = self.visual(images_NCSS)
        return tokens_NPW


def load_local_vision_weights(visual: nn.Module, path: str | Path) -> None:
    """Load a vision tower's weights from a local file: a full open_clip checkpoint
    (`visual.*` keys, optionally under "state_dict" and/or "module."), or the tower's own
    state dict; `.safetensors` or a torch file (loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserValueError(f"pretrained_path {path} is not a local file (weights are never "
                         "downloaded from a hub)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected = visual.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserValueError(f"weights in {path} do not fit the configured vision tower: missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")

