"""Typed, nested experiment configuration: YAML presets plus dotted command-line overrides.

OmegaConf structured configs do the parsing, type checking and unknown-key detection (through
`mmfm.yaml_config`, the loader shared with the data recipes); this module adds the cross-field
rules and turns every failure into one `ConfigError` line that names the field path (e.g. `model.n_heads=6 is not divisible by model.n_kv_heads=4`).
Configs hold plain values only: no process groups, devices or tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmfm.device import DEVICES, PRECISIONS
from mmfm.encoders.config import MultimodalConfig
from mmfm.errors import UserValueError
from mmfm.model.layers import QK_NORMS
from mmfm.model.rope import RopeScalingConfig
from mmfm.moe.config import MoEConfig
from mmfm.parallel.config import ParallelConfig
from mmfm.seq_len import SeqLenStage, validate_seq_len_schedule
from mmfm.yaml_config import merge_structured, read_yaml_mapping

ATTENTIONS = ("sdpa", "flash_attn")
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
    # QK-norm (RMSNorm on queries and keys before RoPE, for stability): none; head = per head
    # over Dh (Qwen3); full = over the whole q/k projection (OLMoE, OLMo-2).
    qk_norm: str = "none"
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2; kept for import)
    # Longer contexts than trained at: linear, dynamic (NTK), yarn, llama3 (mmfm/model/rope.py).
    rope_scaling: RopeScalingConfig | None = None
    # sdpa: torch's scaled_dot_product_attention (picks the flash kernel on CUDA by itself).
    # flash_attn: the flash-attn package (optional, CUDA only), varlen kernels for packed docs.
    attention: str = "sdpa"
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
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"{path}.qk_norm={self.qk_norm!r} is not one of {', '.join(QK_NORMS)}")
        if self.rope_scaling is not None:
            try:
                self.rope_scaling.validate(f"{path}.rope_scaling")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        self._validate_attention(path)
        for name in ("rope_theta", "norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}={getattr(self, name)} must be > 0")
        if self.moe is not None and self.moe.first_dense >= self.n_layers:
            raise ConfigError(
                f"{path}.moe.first_dense={self.moe.first_dense} leaves no MoE layer: it must be < "
                f"{path}.n_layers={self.n_layers} (set {path}.moe=null for a dense model)"
            )
        if self.moe is not None:
            try:
                self.moe.validate(f"{path}.moe")
            except ValueError as err:
                raise ConfigError(str(err)) from None

    def _validate_attention(self, path: str) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError(
                f"{path}.attention={self.attention!r} is not one of {', '.join(ATTENTIONS)}")
        if self.attention == "flash_attn":
            from mmfm.model.layers import check_flash_attn_available

            check_flash_attn_available(path)  # MissingDependencyError, one line

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
    # Damaged shards and sample counts that differ from the index: stop naming shard and byte
    # (strict) or skip, count and log (lenient, the default). Out-of-vocabulary ids always stop.
    strict: bool = False

    def validate(self, path: str = "data") -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"{path}.kind={self.kind!r} is not one of {', '.join(DATA_KINDS)}")
        if self.seq_len <= 0:
            raise ConfigError(f"{path}.seq_len={self.seq_len} must be > 0")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers={self.num_workers} must be >= 0")


@dataclass(kw_only=True)
class GuardConfig:
    """Thresholds of the numerics guard (`mmfm.train.guards.StepGuard`, whose docstring
    gives the rules): skip non-finite and spiking steps, roll back, stop."""

    window: int = 100  # good steps in the rolling loss statistics
    min_history: int = 20  # good steps seen before spikes are detected at all
    z_threshold: float = 6.0  # a loss this many stds above the rolling mean is a spike
    min_rel_std: float = 0.05  # std floor, as a fraction of the mean
    max_consecutive_bad: int = 5  # this many skipped steps in a row trigger a rollback
    max_rollbacks: int = 3  # rollbacks allowed in one run before stopping
    detect_spikes: bool = True

    def validate(self, path: str = "train.guard") -> None:
        for name in ("window", "min_history", "max_consecutive_bad"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}={getattr(self, name)} must be > 0")
        if self.min_history > self.window:
            raise ConfigError(f"{path}.min_history={self.min_history} exceeds {path}.window={self.window}")
        for name in ("z_threshold", "min_rel_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{path}.{name}={value} must be a finite number > 0")
        if self.max_rollbacks < 0:
            raise ConfigError(f"{path}.max_rollbacks={self.max_rollbacks} must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimizer, schedule, device and precision, evaluation and checkpoint cadence."""

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
    # auto: CUDA when a GPU is visible (one per local rank), else the CPU (mmfm.device).
    device: str = "auto"
    # auto: bf16 where the hardware runs it natively (CUDA with bf16; CPUs with AVX512-BF16 or
    # AMX), fp32 elsewhere; fp8: torchao float8 linears on GPUs of capability >= 8.9.
    precision: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    # Start from these weights (a checkpoint or a folder with model.safetensors, e.g. from
    # `mmfm upcycle` or `mmfm import hf`); optimizer and data start fresh. Ignored on --resume.
    init_from: str | None = None
    # Long context (mmfm/seq_len.py, docs/training.md): stages [{step, seq_len}, ...]; steps
    # before the first stage run at data.seq_len. keep_tokens_per_step: rows of a micro-batch
    # scale with 1/seq_len so each step sees the step-0 token count; false: rows stay fixed.
    seq_len_schedule: list[SeqLenStage] = field(default_factory=list)
    keep_tokens_per_step: bool = True
    guard: GuardConfig = field(default_factory=GuardConfig)

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
        if self.device not in DEVICES:
            raise ConfigError(f"{path}.device={self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"{path}.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.precision == "fp8" and self.device == "cpu":
            raise ConfigError(f"{path}.precision=fp8 needs a GPU (compute capability >= 8.9), "
                              f"but {path}.device=cpu; use {path}.precision=auto")
        if self.grad_clip < 0:
            raise ConfigError(f"{path}.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay={self.weight_decay} must be >= 0")
        self.guard.validate(f"{path}.guard")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}={getattr(self, name)} must be in [0, 1)")


@dataclass(kw_only=True)
class MetricsConfig:
    """Metric sinks: JSONL is always written; console and Weights & Biases are optional."""

    console: bool = True
    wandb: bool = False
    wandb_project: str = "mmfm"
    wandb_mode: str = "offline"  # offline needs no account; `online` syncs live
    # Every N steps, record one fixed small validation batch's routing (top-k experts and gate
    # weights per token and MoE layer) to RUN/routing/train/ (mmfm.report.capture); 0: never.
    routing_trace_every: int = 0
    routing_trace_tokens: int = 2048  # tokens of that batch (whole validation rows)

    def validate(self, path: str = "metrics") -> None:
        if self.routing_trace_every < 0:
            raise ConfigError(f"{path}.routing_trace_every={self.routing_trace_every} must be "
                              ">= 0 (0 disables)")
        if self.routing_trace_tokens <= 0:
            raise ConfigError(f"{path}.routing_trace_tokens={self.routing_trace_tokens} must be > 0")
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

    def validate(self, path: str = "run") -> None:
        # The run folder is created, locked and (with an overwrite flag) replaced, so its name
        # must stay inside out_dir: no absolute path, no `..`, not out_dir itself.
        name = Path(self.name)
        if not self.name or name.is_absolute() or ".." in name.parts or name.parts in ((), (".",)):
            raise ConfigError(
                f"{path}.name={self.name!r} must be a relative folder name inside "
                f"{path}.out_dir={self.out_dir!r} (no absolute path, no '..')"
            )


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
        refuse_non_finite(self)
        self.run.validate()
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.metrics.validate()
        try:  # the world size is checked again at launch, when it is known
            self.parallel.validate("parallel", self.model, train_cfg=self.train)
            self.parallel.validate_seq_len(self.data.seq_len)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.train.precision == "fp8":
            self._validate_fp8_layout()
        if self.model.attention == "flash_attn" and self.train.precision == "fp32":
            raise ConfigError("model.attention=flash_attn runs in bf16/fp16 only, but "
                              "train.precision=fp32; use model.attention=sdpa")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        try:
            validate_seq_len_schedule(self)
        except ValueError as err:
            raise ConfigError(str(err)) from None
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
        if self.data.kind != "text" and p.cp > 1:
            raise ConfigError(f"parallel.cp={p.cp}: context parallelism is not implemented for "
                              f"data.kind={self.data.kind!r} (data, tensor, expert and pipeline "
                              f"parallelism are; cp needs 1)")
        if self.data.kind == "multimodal" and p.engine == "deepspeed":
            # Checked by hand (dp2 × ep2, ZeRO-2): the task counts micro-batches on the model,
            # which DeepSpeed's engine hides, and a rank whose batch holds no media aborts in
            # DeepSpeed's backward on the encoder weights it did not use.
            raise ConfigError("parallel.engine=deepspeed does not train data.kind='multimodal' "
                              "(ranks without media leave encoder weights unused, which "
                              "DeepSpeed's backward does not allow); use parallel.engine=fsdp "
                              "or ddp")
        if p.cp > 1 and self.metrics.routing_trace_every:
            # The trace is a forward on rank 0 alone; cp attention needs every rank of the group.
            raise ConfigError(f"metrics.routing_trace_every={self.metrics.routing_trace_every} "
                              f"is not available with parallel.cp={p.cp} (the routing sample runs "
                              f"on rank 0 alone); set metrics.routing_trace_every=0")

    def _validate_fp8_layout(self) -> None:
        """torchao's float8 linears compose with FSDP2 and DDP here; tensor parallelism would
        need torchao's float8 TP plans and DeepSpeed would wrap them untested, so both are
        refused before launch rather than failing on the cluster."""
        if self.parallel.tp > 1:
            raise ConfigError(f"train.precision=fp8 does not compose with parallel.tp="
                              f"{self.parallel.tp} yet; use train.precision=bf16 or parallel.tp=1")
        if self.parallel.engine == "deepspeed":
            raise ConfigError("train.precision=fp8 is not supported with parallel.engine="
                              "deepspeed; use parallel.engine=fsdp or train.precision=bf16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def refuse_non_finite(obj: Any, path: str = "") -> None:
    """Refuse NaN and infinity in every float field of a (nested) config, naming the field.

    The range checks of each section cannot see NaN (every comparison with it is False), so
    this walk runs first and covers all sections, including ones added later."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            refuse_non_finite(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            refuse_non_finite(value, f"{path}.{key}")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{path}={obj} must be a finite number")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML preset (or defaults when `path` is None), apply `a.b.c=value` overrides,
    validate, and return the typed config. Every user error is a one-line `ConfigError`."""
    layers = [read_yaml_mapping(path, ConfigError)] if path is not None else []
    cfg = merge_structured(ExperimentConfig, layers, overrides, ConfigError, path)
    assert isinstance(cfg, ExperimentConfig)
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a typed config from `to_dict()` output (e.g. a checkpoint's saved config)."""
    cfg = merge_structured(ExperimentConfig, [data], (), ConfigError)
    cfg.validate()
    return cfg


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (what the run really used)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
