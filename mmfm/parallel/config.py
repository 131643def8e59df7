"""`parallel:` section of the experiment config: the layout of a distributed run.

The world is `pp × dp × cp × tp` processes. Expert parallelism does not add processes: the `ep`
ranks that shard each MoE layer's experts are drawn from the data-parallel ranks (torchtitan's
dp2ep, Megatron's expert-data-parallel groups), so `ep` must divide `dp`. Context-parallel
(`cp`) ranks share their data rows and each holds a contiguous 1/cp of every sequence
(`mmfm.parallel.context_parallel`). Every rule is checked before any compute and a violation
raises a `ValueError` naming the fields and their values. Plain values only: the process groups live in `mmfm.parallel.mesh.ParallelDims`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from mmfm.errors import UserValueError

ENGINES = ("ddp", "fsdp", "deepspeed")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
# ZeRO stages each engine can express, and the one it uses when `zero_stage` is null.
ENGINE_STAGES = {"ddp": (0,), "fsdp": (2, 3), "deepspeed": (0, 1, 2, 3)}
DEFAULT_STAGE = {"ddp": 0, "fsdp": 3, "deepspeed": 2}


@dataclass(kw_only=True)
class ParallelConfig:
    """How one training run is laid out over processes."""

    dp: int | None = None  # data-parallel replicas; null = world size / (tp × pp × cp)
    tp: int = 1  # tensor parallel (attention heads and FFN columns)
    pp: int = 1  # pipeline stages
    ep: int = 1  # expert parallel, drawn from the dp ranks (ep divides dp)
    cp: int = 1  # context parallel: each sequence split over cp ranks (Ulysses all-to-all)
    # ddp: replicated weights, gradients all-reduced (ZeRO-0). fsdp: PyTorch FSDP2 fully_shard
    # (zero_stage 2 keeps weights gathered between forward and backward, 3 re-shards them).
    # deepspeed: DeepSpeed ZeRO stage 0-3 (data and expert parallel only).
    engine: str = "fsdp"
    zero_stage: int | None = None
    microbatches: int = 1  # pipeline micro-batches per optimizer step (pp > 1)
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1  # stages per pipeline rank (interleaved_1f1b needs >= 2)
    pp_split: list[int] | None = None  # decoder layers per stage; null = even split
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    timeout_s: float = 300.0  # collective timeout
    rank_timeout_s: float = 60.0  # a rank silent this long is reported dead (0 disables)
    # Resume a checkpoint written with another dp: restart data order instead of failing.
    reshard_loader: bool = False

    @property
    def stage(self) -> int:
        """The ZeRO stage in effect (the engine's default when `zero_stage` is null)."""
        return DEFAULT_STAGE[self.engine] if self.zero_stage is None else self.zero_stage

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_virtual_stages

    def resolved_dp(self, world_size: int) -> int:
        return self.dp if self.dp is not None else max(
            1, world_size // (self.tp * self.pp * self.cp))

    def world_size(self) -> int | None:
        """Processes this layout needs, when `dp` is given."""
        return None if self.dp is None else self.dp * self.tp * self.pp * self.cp

    def is_trivial(self) -> bool:
        """One process and nothing for `parallelize` to do (the single-process trainer)."""
        return (self.dp in (None, 1) and self.tp == self.pp == self.cp == 1
                and not (self.activation_checkpointing or self.compile))

    def validate(self, path: str = "parallel", model_cfg=None, world_size: int | None = None,
                 train_cfg=None) -> None:
        """Raise ValueError naming the first field that does not fit; `world_size`, the model
        and the train config are checked when given."""
        self._validate_own(path)
        if model_cfg is not None:
            self._validate_model(path, model_cfg)
        if world_size is not None:
            self._validate_world(path, world_size)
        if train_cfg is not None and self.pp > 1:
            rows = train_cfg.micro_batch_size * train_cfg.grad_accum
            if rows % self.microbatches:
                raise UserValueError(
                    f"{path}.microbatches={self.microbatches} does not divide the "
                    f"{rows} rows per step (train.micro_batch_size={train_cfg.micro_batch_size}"
                    f" × train.grad_accum={train_cfg.grad_accum})")

    def _validate_own(self, path: str) -> None:
        for name in ("tp", "pp", "ep", "cp", "microbatches", "pp_virtual_stages"):
            if getattr(self, name) < 1:
                raise UserValueError(f"{path}.{name}={getattr(self, name)} must be >= 1")
        if self.dp is not None and self.dp < 1:
            raise UserValueError(f"{path}.dp={self.dp} must be >= 1 (or null for the rest of the world)")
        if self.engine not in ENGINES:
            raise UserValueError(f"{path}.engine={self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise UserValueError(f"{path}.engine=deepspeed needs the deepspeed package, which is not "
                             f"installed: `pip install deepspeed`, or set {path}.engine=fsdp")
        if self.stage not in ENGINE_STAGES[self.engine]:
            allowed = ", ".join(map(str, ENGINE_STAGES[self.engine]))
            hint = " (FSDP2 always shards gradients; ZeRO-1 needs parallel.engine=deepspeed)" \
                if self.engine == "fsdp" else ""
            raise UserValueError(f"{path}.zero_stage={self.zero_stage} is not available with "
                             f"{path}.engine={self.engine} (allowed: {allowed}){hint}")
        if self.engine == "deepspeed":
            self._validate_deepspeed(path)
        self._validate_pipeline(path)
        self._validate_context(path)
        for name in ("timeout_s", "rank_timeout_s"):
            if getattr(self, name) < 0:
                raise UserValueError(f"{path}.{name}={getattr(self, name)} must be >= 0")

    def _validate_deepspeed(self, path: str) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) > 1:
                raise UserValueError(
                    f"{path}.engine=deepspeed composes with data and expert parallelism only, "
                    f"not {path}.{name}={getattr(self, name)}; use {path}.engine=fsdp (or ddp) "
                    f"for tensor and pipeline layouts")
        if self.stage == 3 and self.ep > 1:
            raise UserValueError(
                f"{path}.engine=deepspeed with {path}.zero_stage=3 cannot shard expert-parallel "
                f"experts ({path}.ep={self.ep}): DeepSpeed ZeRO-3 partitions every weight over "
                f"all data-parallel ranks; use {path}.engine=fsdp (shards experts over their "
                f"expert-data-parallel ranks), or {path}.zero_stage<=2, or {path}.ep=1")

    def _validate_context(self, path: str) -> None:
        """Context parallelism composes with what its parity tests cover (dp with ddp or fsdp,
        tp, activation checkpointing); the rest is refused before any compute."""
        if self.cp == 1:
            return
        for name, why in (("pp", "pipeline stages pass activations of whole sequences"),
                          ("ep", "expert gradients would need reducing over ep × cp groups")):
            if getattr(self, name) > 1:
                raise UserValueError(f"{path}.cp={self.cp} does not compose with {path}.{name}="
                                     f"{getattr(self, name)} yet ({why}); use {path}.{name}=1")
        if self.engine == "deepspeed":
            raise UserValueError(f"{path}.cp={self.cp} does not compose with {path}.engine="
                                 f"deepspeed (untested); use {path}.engine=fsdp or ddp")
        if self.compile:
            raise UserValueError(f"{path}.cp={self.cp} with {path}.compile=true is untested "
                                 f"(all-to-all inside compiled blocks); set {path}.compile=false")

    def validate_seq_len(self, seq_len: int, path: str = "parallel",
                         seq_path: str = "data.seq_len") -> None:
        """Each context-parallel rank holds an equal contiguous chunk of every sequence."""
        if seq_len % self.cp:
            raise UserValueError(f"{path}.cp={self.cp} does not divide {seq_path}={seq_len}: "
                                 f"each context-parallel rank holds seq_len/cp tokens")

    def _validate_pipeline(self, path: str) -> None:
        if self.pp_schedule not in PP_SCHEDULES:
            raise UserValueError(
                f"{path}.pp_schedule={self.pp_schedule!r} is not one of {', '.join(PP_SCHEDULES)}")
        if self.pp == 1:
            return
        interleaved = self.pp_schedule == "interleaved_1f1b"
        if interleaved and self.pp_virtual_stages < 2:
            raise UserValueError(f"{path}.pp_schedule=interleaved_1f1b needs "
                             f"{path}.pp_virtual_stages >= 2 (got {self.pp_virtual_stages})")
        if not interleaved and self.pp_virtual_stages != 1:
            raise UserValueError(f"{path}.pp_virtual_stages={self.pp_virtual_stages} needs "
                             f"{path}.pp_schedule=interleaved_1f1b")
        if self.pp_schedule != "gpipe" and self.microbatches < self.num_stages:
            raise UserValueError(
                f"{path}.pp_schedule={self.pp_schedule} needs {path}.microbatches="
                f"{self.microbatches} >= the {self.num_stages} pipeline stages")
        if interleaved and self.microbatches % self.pp:
            raise UserValueError(f"{path}.pp_schedule=interleaved_1f1b needs {path}.microbatches="
                             f"{self.microbatches} to be a multiple of {path}.pp={self.pp}")

    def _validate_model(self, path: str, model_cfg) -> None:
        m = "model"
        if self.tp > 1:
            for name in ("n_heads", "n_kv_heads", "ffn_hidden"):
                value = getattr(model_cfg, name)
                if value % self.tp:
                    raise UserValueError(f"{path}.tp={self.tp} does not divide {m}.{name}={value}")
            if getattr(model_cfg, "qk_norm", "none") == "full":
                # The norm spans all heads, but each tp rank holds only H/tp of them.
                raise UserValueError(f"{path}.tp={self.tp} cannot shard {m}.qk_norm=full (it "
                                     "normalizes across heads); use qk_norm=head or tp=1")
            moe = model_cfg.moe
            if moe is not None and moe.num_shared_experts:
                shared = moe.num_shared_experts * (moe.shared_expert_hidden or moe.expert_hidden
                                                   or model_cfg.ffn_hidden)
                if shared % self.tp:
                    raise UserValueError(f"{path}.tp={self.tp} does not divide the shared-expert "
                                     f"hidden size {shared} ({m}.moe.num_shared_experts × "
                                     f"{m}.moe.shared_expert_hidden)")
        if self.cp > 1:
            self._validate_context_model(path, model_cfg)
        if self.ep > 1:
            if model_cfg.moe is None:
                raise UserValueError(f"{path}.ep={self.ep} needs an MoE model, but {m}.moe is null")
            if model_cfg.moe.num_experts % self.ep:
                raise UserValueError(f"{path}.ep={self.ep} does not divide "
                                 f"{m}.moe.num_experts={model_cfg.moe.num_experts}")
        self._validate_split(path, model_cfg.n_layers)

    def _validate_context_model(self, path: str, model_cfg) -> None:
        """Ulysses attention gives each cp rank (H/tp)/cp query and (K/tp)/cp key/value heads."""
        for name in ("n_heads", "n_kv_heads"):
            heads = getattr(model_cfg, name) // self.tp
            if heads % self.cp:
                per_tp = f" / {path}.tp={self.tp}" if self.tp > 1 else ""
                raise UserValueError(
                    f"{path}.cp={self.cp} does not divide model.{name}={getattr(model_cfg, name)}"
                    f"{per_tp}: context parallelism exchanges sequence shards for head shards")
        moe = model_cfg.moe
        if moe is not None and moe.seq_aux_loss_coef > 0:
            raise UserValueError(
                f"{path}.cp={self.cp} with model.moe.seq_aux_loss_coef={moe.seq_aux_loss_coef}: "
                f"the sequence-wise balance loss needs whole sequences on one rank; set "
                f"model.moe.seq_aux_loss_coef=0 (the Switch and z losses work with cp)")

    def _validate_split(self, path: str, n_layers: int) -> None:
        stages = self.num_stages
        if stages == 1:
            if self.pp_split is not None and list(self.pp_split) != [n_layers]:
                raise UserValueError(f"{path}.pp_split={list(self.pp_split)} is set but {path}.pp=1")
            return
        if self.pp_split is None:
            if n_layers % stages:
                raise UserValueError(
                    f"{path}.pp={self.pp} × {path}.pp_virtual_stages={self.pp_virtual_stages} = "
                    f"{stages} stages do not divide model.n_layers={n_layers}; give "
                    f"{path}.pp_split (layers per stage)")
            return
        split = list(self.pp_split)
        if len(split) != stages or any(n < 1 for n in split) or sum(split) != n_layers:
            raise UserValueError(
                f"{path}.pp_split={split} must list {stages} positive layer counts summing to "
                f"model.n_layers={n_layers}")

    def _validate_world(self, path: str, world_size: int) -> None:
        dp = self.resolved_dp(world_size)
        if dp * self.tp * self.pp * self.cp != world_size:
            cp = f" × {path}.cp={self.cp}" if self.cp > 1 else ""
            raise UserValueError(
                f"{path}.dp={dp} × {path}.tp={self.tp} × {path}.pp={self.pp}{cp} = "
                f"{dp * self.tp * self.pp * self.cp} does not equal the world size {world_size} "
                f"(processes launched)")
        if dp % self.ep:
            raise UserValueError(f"{path}.ep={self.ep} does not divide {path}.dp={dp}: expert-parallel "
                             f"ranks are drawn from the data-parallel ranks")

    def stage_layers(self, n_layers: int) -> list[list[int]]:
        """Decoder layer indices of each pipeline stage, in stage order."""
        stages = self.num_stages
        split = list(self.pp_split) if self.pp_split else [n_layers // stages] * stages
        out, start = [], 0
        for n in split:
            out.append(list(range(start, start + n)))
            start += n
        return out
