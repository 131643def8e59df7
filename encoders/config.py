"""Typed configuration of the interleaved multimodal job: encoders, shard sources, loss and
modality-aware routing. Nested under `ExperimentConfig.multimodal` (None for text runs).

Keyword-only dataclasses that OmegaConf structured configs accept; every `validate` raises
`ValueError` naming the field path (`multimodal.audio.subsample=3 must be a power of 2`).
No torch imports here: the CLI parses configs before any heavy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmfm.errors import UserValueError

# kind -> the modality it encodes
ENCODER_KINDS = {"openclip": "image", "patch": "image", "whisper": "audio"}
TRAIN_MODES = ("trainable", "frozen", "unfreeze_after")
PROJECTORS = ("linear", "mlp")
ROUTING_MODES = ("shared", "modality")
MIXTURE_MODES = ("tokens", "documents", "sample")  # mmfm.data.mm_mixture
MODALITIES = ("text", "image", "audio")  # modality ids 0, 1, 2 everywhere


@dataclass(kw_only=True)
class EncoderConfig:
    """One modality encoder plus its projector to the decoder width."""

    kind: str = "patch"  # openclip | patch (image) | whisper (audio)
    width: int = 128  # encoder hidden size D_enc (custom towers)
    layers: int = 2
    heads: int = 4
    # Images: square input size and patch size (tokens per image = (image_size/patch_size)^2).
    image_size: int = 64
    patch_size: int = 16
    # OpenCLIP: a model config name known to open_clip (e.g. "ViT-B-32"); None builds the
    # custom tower above (width/layers/heads/image_size/patch_size).
    openclip_model: str | None = None
    # Weights from a local file only (an open_clip checkpoint or a vision-tower state dict).
    pretrained_path: str | None = None
    # Audio: resampled to sample_rate, log-mel with n_mels bins every hop_length samples,
    # clipped to max_seconds, then a conv subsampler of total stride `subsample`.
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    max_seconds: float = 8.0
    subsample: int = 4
    projector: str = "mlp"  # linear | mlp (2 layers, GELU)
    train_mode: str = "trainable"  # trainable | frozen | unfreeze_after
    unfreeze_after_steps: int = 0

    @property
    def modality(self) -> str:
        return ENCODER_KINDS[self.kind]

    def validate(self, path: str) -> None:
        _choice(f"{path}.kind", self.kind, tuple(ENCODER_KINDS))
        _choice(f"{path}.projector", self.projector, PROJECTORS)
        _choice(f"{path}.train_mode", self.train_mode, TRAIN_MODES)
        for name in ("width", "layers", "heads", "image_size", "patch_size", "sample_rate",
                     "n_mels", "n_fft", "hop_length", "subsample"):
            _positive(f"{path}.{name}", getattr(self, name))
        if self.width % self.heads:
            raise UserValueError(f"{path}.width={self.width} is not divisible by {path}.heads={self.heads}")
        if self.image_size % self.patch_size:
            raise UserValueError(f"{path}.image_size={self.image_size} is not divisible by "
                             f"{path}.patch_size={self.patch_size}")
        if self.subsample & (self.subsample - 1):
            raise UserValueError(f"{path}.subsample={self.subsample} must be a power of 2")
        if self.max_seconds <= 0:
            raise UserValueError(f"{path}.max_seconds={self.max_seconds} must be > 0")
        if self.unfreeze_after_steps < 0:
            raise UserValueError(f"{path}.unfreeze_after_steps={self.unfreeze_after_steps} must be >= 0")
        if self.pretrained_path is not None and "://" in self.pretrained_path:
            raise UserValueError(f"{path}.pretrained_path={self.pretrained_path!r}: weights load "
                             "only from a local file, never from a URL or hub")


@dataclass(kw_only=True)
class SourceConfig:
    """One shard set (written by `mmfm data shards --multimodal`) and its mixture weight."""

    train: str  # directory with index.json and the train shards
    val: str | None = None  # its validation shards (optional)
    weight: float = 1.0


@dataclass(kw_only=True)
class MultimodalConfig:
    """The multimodal job: where interleaved shards are, how media become decoder inputs."""

    # name -> shard set; a dict, so `multimodal.sources.images.weight=2` overrides one.
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    image: EncoderConfig | None = field(default_factory=lambda: EncoderConfig(kind="patch"))
    audio: EncoderConfig | None = field(default_factory=lambda: EncoderConfig(kind="whisper"))
    shuffle_buffer: int = 64  # documents held per source for shuffling (1 = no shuffle)
    strict: bool = False  # stop on a bad sample (naming shard and key) instead of skipping it
    # Images over this many pixels are skipped and counted (image_too_large) before decoding;
    # the default 2^23 keeps one decode under ~100 MB (see mmfm.encoders.media).
    max_image_pixels: int = 2**23
    # Loss on text targets only (default), or also on <|image_start|>/<|image_end|>-style markers.
    loss_on_markers: bool = False
    # MoE routing: one router over all tokens (shared) or modality expert groups (MoMa).
    moe_routing: str = "shared"
    modality_experts: dict[str, int] = field(default_factory=dict)  # {"text": 4, "image": 2}
    # Read frozen encoders' outputs from the feature caches `mmfm data encode` wrote beside
    # the shards, when every shard set has a current one (stale caches are refused).
    feature_cache: bool = True
    # How sources are mixed: `tokens` (each batch holds each source's weight share of tokens,
    # within 2 documents), `documents` (the same by document count) or `sample` (random draws,
    # weights honoured only in expectation). See mmfm.data.mm_mixture.
    mixture: str = "tokens"

    def encoders(self) -> dict[str, EncoderConfig]:
        """{modality: encoder config} of the configured encoders."""
        return {m: c for m, c in (("image", self.image), ("audio", self.audio)) if c is not None}

    def validate(self, path: str = "multimodal", exp: Any = None) -> None:
        """Check this section; with `exp` (the ExperimentConfig) also the cross-section rules."""
        for modality, enc in self.encoders().items():
            enc.validate(f"{path}.{modality}")
            if enc.modality != modality:
                raise UserValueError(f"{path}.{modality}.kind={enc.kind!r} encodes {enc.modality}, "
                                 f"not {modality}")
        self._validate_sources(path)
        _positive(f"{path}.shuffle_buffer", self.shuffle_buffer)
        _positive(f"{path}.max_image_pixels", self.max_image_pixels)
        _choice(f"{path}.moe_routing", self.moe_routing, ROUTING_MODES)
        _choice(f"{path}.mixture", self.mixture, MIXTURE_MODES)
        if exp is not None:
            self._validate_routing(path, exp.model)
            self._validate_expert_parallel(path, exp)

    def _validate_sources(self, path: str) -> None:
        for name, src in self.sources.items():
            if src.weight <= 0:
                raise UserValueError(f"{path}.sources.{name}.weight={src.weight} must be > 0")
            if not src.train:
                raise UserValueError(f"{path}.sources.{name}.train is empty")

    def _validate_routing(self, path: str, model: Any) -> None:
        if self.moe_routing == "shared":
            return
        if model.moe is None:
            raise UserValueError(f"{path}.moe_routing=modality needs an MoE model (model.moe is null)")
        unknown = sorted(set(self.modality_experts) - set(MODALITIES))
        if unknown or "text" not in self.modality_experts:
            raise UserValueError(f"{path}.modality_experts={dict(self.modality_experts)} must name a "
                             f"'text' group and only modalities in {', '.join(MODALITIES)}")
        total = sum(self.modality_experts.values())
        if total != model.moe.num_experts:
            raise UserValueError(f"{path}.modality_experts={dict(self.modality_experts)} hold {total} "
                             f"experts but model.moe.num_experts={model.moe.num_experts} (the "
                             "groups partition the experts, so parameter counts stay true)")
        for modality, n in self.modality_experts.items():
            if n < model.moe.top_k:
                raise UserValueError(f"{path}.modality_experts.{modality}={n} is smaller than "
                                 f"model.moe.top_k={model.moe.top_k}")


    def _validate_expert_parallel(self, path: str, exp: Any) -> None:
        """Expert parallelism shards every modality group over the ep ranks (n_g / ep each)."""
        ep = exp.parallel.ep
        if self.moe_routing != "modality" or ep == 1:
            return
        for modality, n in self.modality_experts.items():
            if n % ep:
                raise UserValueError(
                    f"parallel.ep={ep} does not divide {path}.modality_experts.{modality}={n}: "
                    f"each modality group's experts are sharded over the ep ranks")


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise UserValueError(f"{path}={value} must be > 0")


def _choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserValueError(f"{path}={value!r} is not one of {', '.join(allowed)}")
