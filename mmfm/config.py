"""Typed, nested experiment configuration: YAML presets plus dotted command-line overrides.

OmegaConf structured configs do the parsing, type checking and unknown-key detection; this
module adds the cross-field rules and turns every failure into one `ConfigError` line that
names the field path (e.g. `model.n_heads=6 is not divisible by model.n_kv_heads=4`).
Configs hold plain values only: no process groups, devices or tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmfm.encoders.config import MultimodalConfig
from mmfm.errors import UserValueError
from mmfm.moe.config import MoEConfig
from mmfm.parallel.config import ParallelConfig

PRECISIONS = ("fp32", "bf16")
DATA_KINDS = ("text", "multimodal")  # which `mmfm.train.task` builds the model, data and loss


class ConfigError(UserValueError):
    """A user error in a config file or override; the message is one line naming the field."""


@dataclass(kw_only=True)
class ModelConfig:
    """Decoder-only transformer shape. `moe: null` gives the dense model.

    The defaults are the tiny demo model (configs/text_moe_tiny.yaml spells them out)."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_hidden: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Fuse the LM head with the loss (mmfm/model/fused_loss.py): no (B, T, V) logits in
    # training, about 1.3-1.6x faster head+loss on CPU. False: plain head, then cross entropy.
    fused_loss: bool = True
    moe: MoEConfig | None = field(default_factory=lambda: MoEConfig(expert_hidden=256))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, path: str = "model") -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}={getattr(self, name)} must be > 0")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"{path}.d_model={self.d_model} is not divisible by {path}.n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{path}.n_heads={self.n_heads} is not divisible by "
                f"{path}.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{path}: head_dim={self.head_dim} must be even for RoPE")
        if self.moe is not None:
            try:
                self.moe.validate(f"{path}.moe")
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def build(self):
        """The `mmfm.model.Decoder` this config describes (random init)."""
        from mmfm.model import Decoder

        return Decoder(self)


@dataclass(kw_only=True)
class DataConfig:
    """Where token shards and the tokenizer live, and how sequences are packed."""

    kind: str = "text"
    train_shards: str = "runs/demo/data/shards/train"
    val_shards: str = "runs/demo/data/shards/val"
    tokenizer: str = "runs/demo/data/tokenizer.json"
    seq_len: int = 256
    num_workers: int = 0
    # Block-diagonal causal attention so packed documents never attend to each other.
    document_mask: bool = True

    def validate(self, path: str = "data") -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"{path}.kind={self.kind!r} is not one of {', '.join(DATA_KINDS)}")
        if self.seq_len <= 0:
            raise ConfigError(f"{path}.seq_len={self.seq_len} must be > 0")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers={self.num_workers} must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimizer, schedule, precision, evaluation and checkpoint cadence."""

    steps: int = 250
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 25
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "bf16"
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    # Start from these weights (a checkpoint or a folder with model.safetensors, e.g. from
    # `mmfm upcycle` or `mmfm import hf`); optimizer and data start fresh. Ignored on --resume.
    init_from: str | None = None

    def validate(self, path: str = "train") -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "eval_every", "eval_batches",
                     "ckpt_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}={getattr(self, name)} must be > 0")
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{path}.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(
                f"{path}.warmup_steps={self.warmup_steps} must be in [0, {path}.steps={self.steps}]"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{path}.precision={self.precision!r} is not one of fp32, bf16")
        if self.grad_clip < 0:
            raise ConfigError(f"{path}.grad_clip={self.grad_clip} must be >= 0 (0 disables)")


@dataclass(kw_only=True)
class MetricsConfig:
    """Metric sinks: JSONL is always written; console and Weights & Biases are optional."""

    console: bool = True
    wandb: bool = False
    wandb_project: str = "mmfm"
    wandb_mode: str = "offline"  # offline needs no account; `online` syncs live

    def validate(self, path: str = "metrics") -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(
                f"{path}.wandb_mode={self.wandb_mode!r} is not one of offline, online, disabled"
            )


@dataclass(kw_only=True)
class RunConfig:
    """Identity of a run: its name, where its outputs go, its seed."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass(kw_only=True)
class ExperimentConfig:
    """Everything one `mmfm train` run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    multimodal: MultimodalConfig | None = None  # interleaved text/image/audio (data.kind=multimodal)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # distributed layout

    def validate(self) -> None:
        """Check every section and the rules that span sections, before any compute."""
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.metrics.validate()
        try:  # the world size is checked again at launch, when it is known
            self.parallel.validate("parallel", self.model, train_cfg=self.train)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.data.kind == "multimodal" and self.multimodal is None:
            raise ConfigError("data.kind=multimodal needs a multimodal: section "
                              "(see configs/mm_moe_tiny.yaml)")
        if self.multimodal is not None:
            try:
                self.multimodal.validate("multimodal", self)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        self._validate_layout()

    def _validate_layout(self) -> None:
        """The layouts each job supports: a rule spanning `data` and `parallel`, checked here so
        `mmfm launch` refuses what the ranks would refuse, before any process starts."""
        p = self.parallel
        if self.data.kind != "text" and max(p.tp, p.pp, p.ep) > 1:
            raise ConfigError(f"parallel.tp={p.tp}, parallel.pp={p.pp}, parallel.ep={p.ep}: "
                              f"only data parallelism is implemented for "
                              f"data.kind={self.data.kind!r} (tp, pp and ep need 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML preset (or defaults when `path` is None), apply `a.b.c=value` overrides,
    validate, and return the typed config. Every user error is a one-line `ConfigError`."""
    schema = OmegaConf.structured(ExperimentConfig)
    layers = [schema]
    if path is not None:
        layers.append(_read_yaml(Path(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err, path)) from None
    assert isinstance(cfg, ExperimentConfig)
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a typed config from `to_dict()` output (e.g. a checkpoint's saved config)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(data))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err, None)) from None
    cfg.validate()
    return cfg


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (what the run really used)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _read_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return OmegaConf.create(data)


def _one_line(err: OmegaConfBaseException, path: str | Path | None) -> str:
    """OmegaConf's messages are multi-line with a `full_key`; keep the key and the reason."""
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0].strip()
    where = f" in {path}" if path else ""
    return f"{key}: {reason}{where}" if key else f"{reason}{where}"
