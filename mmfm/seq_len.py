"""Sequence-length schedule of the text training job (`train.seq_len_schedule`): train short,
then continue at a longer context, as OLMo-core's and torchtitan's long-context stages and
Llama 3's long-context continuation do.

A schedule is a list of stages `{step, seq_len}`; stage i runs from its `step` up to the next
stage's. Steps before the first stage run at `data.seq_len`. With
`train.keep_tokens_per_step` (the default) every micro-batch holds as many tokens as the one at
step 0 (`train.micro_batch_size` rows of the step-0 length), so the rows of a micro-batch scale
by the length ratio (256 -> 1024 turns 8 rows into 2); the optimizer sees the same number of
tokens per step throughout and only the context grows.

RoPE under a schedule (see docs/training.md, "Long context"): `model.rope_scaling` applies to
a sequence only when it is longer than `model.rope_scaling.original_max_seq_len`; shorter stages
train with plain RoPE, as the original model was trained before its context was extended (the
Llama 3.1 / YaRN recipe). Without a schedule the scaling applies at every length, as before.

This module is pure (no torch): the config dataclass, the cross-field rules, and the resolved
`SeqLenSchedule` the trainer, the task and the loader read.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

from mmfm.errors import UserValueError

# RoPE scalings whose reach is original_max_seq_len × factor (dynamic NTK has no fixed reach).
_BOUNDED_SCALINGS = ("linear", "yarn", "llama3")


@dataclass(kw_only=True)
class SeqLenStage:
    """One entry of `train.seq_len_schedule`: from optimizer step `step` on, train at `seq_len`."""

    step: int = 0
    seq_len: int = 256


@dataclass(frozen=True)
class Stage:
    """A resolved stage: from `start_step` on, micro-batches of `rows` rows of `seq_len` tokens
    on each data-parallel rank."""

    start_step: int
    seq_len: int
    rows: int

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one rank."""
        return self.rows * self.seq_len


class SeqLenSchedule:
    """The stages of a run, resolved from its config; a run without a schedule has one stage
    (`data.seq_len`, `train.micro_batch_size`) from step 0."""

    def __init__(self, stages: list[Stage]) -> None:
        if not stages or stages[0].start_step != 0:
            raise ValueError("a schedule starts with a stage at step 0")
        self.stages = tuple(stages)
        self._starts = [s.start_step for s in stages]

    @classmethod
    def from_config(cls, cfg) -> SeqLenSchedule:
        """The schedule of an `ExperimentConfig` (validated by `validate_seq_len_schedule`)."""
        train, entries = cfg.train, list(cfg.train.seq_len_schedule)
        if not entries or entries[0].step > 0:
            entries.insert(0, SeqLenStage(step=0, seq_len=cfg.data.seq_len))
        tokens = train.micro_batch_size * entries[0].seq_len  # per micro-batch at step 0
        stages = []
        for entry in entries:
            rows = tokens // entry.seq_len if train.keep_tokens_per_step else train.micro_batch_size
            stages.append(Stage(entry.step, entry.seq_len, rows))
        return cls(stages)

    @property
    def is_scheduled(self) -> bool:
        """Whether the length or the rows ever change (more than one distinct stage)."""
        return len({(s.seq_len, s.rows) for s in self.stages}) > 1

    @property
    def lanes(self) -> int:
        """Packing lanes the loader keeps: the most rows any stage takes (see TokenLoader)."""
        return max(s.rows for s in self.stages)

    def at(self, step: int) -> Stage:
        """The stage optimizer step `step` (0-based: the step being computed) runs in."""
        return self.stages[bisect.bisect_right(self._starts, max(step, 0)) - 1]

    def loader_stages(self, grad_accum: int) -> list[tuple[int, int, int]]:
        """(first micro-batch index, seq_len, rows) per stage, in the loader's unit: the
        micro-batches one rank reads, `grad_accum` of them per optimizer step."""
        return [(s.start_step * grad_accum, s.seq_len, s.rows) for s in self.stages]

    def tokens_through(self, steps: int, grad_accum: int) -> int:
        """Tokens one rank has read in the first `steps` optimizer steps."""
        return self._sum_over_steps(steps, lambda s: s.tokens * grad_accum)

    def flops_through(self, steps: int, grad_accum: int, flops_per_token) -> int:
        """Training FLOPs of one rank in the first `steps` steps; `flops_per_token(seq_len)`
        prices a token at its stage's length (attention grows with the context)."""
        return self._sum_over_steps(
            steps, lambda s: s.tokens * grad_accum * flops_per_token(s.seq_len))

    def _sum_over_steps(self, steps: int, per_step) -> int:
        total = 0
        for stage, end in zip(self.stages, self._starts[1:] + [None], strict=True):
            stop = steps if end is None else min(steps, end)
            if stop > stage.start_step:
                total += (stop - stage.start_step) * per_step(stage)
        return total

    def stage_configs(self, cfg):
        """`cfg` as each stage runs it (data.seq_len and train.micro_batch_size of that stage),
        for estimates written for one shape (memory); just `cfg` without a schedule."""
        if not self.is_scheduled:
            yield cfg
            return
        for s in self.stages:
            yield dataclasses.replace(
                cfg, data=dataclasses.replace(cfg.data, seq_len=s.seq_len),
                train=dataclasses.replace(cfg.train, micro_batch_size=s.rows))


# ----------------------------------------------------------------------------- validation

def validate_seq_len_schedule(cfg, path: str = "train.seq_len_schedule") -> None:
    """The rules a schedule must follow, checked before any compute; a UserValueError of one
    line naming the field otherwise. `cfg` is an `ExperimentConfig`."""
    entries = cfg.train.seq_len_schedule
    if not entries:
        return
    _check_entries(entries, cfg.train.steps, path)
    _check_layout(cfg, path)
    lengths = [(f"{path}[{i}].seq_len", e.seq_len) for i, e in enumerate(entries)]
    if entries[0].step > 0:
        lengths.insert(0, ("data.seq_len", cfg.data.seq_len))
    for name, seq_len in lengths:
        if seq_len > cfg.model.max_seq_len:
            raise UserValueError(f"{name}={seq_len} exceeds model.max_seq_len="
                                 f"{cfg.model.max_seq_len}")
        _check_rope_reach(name, seq_len, cfg.model.rope_scaling)
        if seq_len % cfg.parallel.cp:  # each context-parallel rank takes an equal chunk
            raise UserValueError(f"{name}={seq_len} is not divisible by parallel.cp="
                                 f"{cfg.parallel.cp}: every stage's sequences are split into "
                                 f"cp equal chunks")
    if cfg.model.rope_scaling is not None:
        _check_scaling_trained(path, entries[-1].seq_len, cfg.model.rope_scaling)
    if cfg.train.keep_tokens_per_step:
        _check_rows(lengths, cfg.train.micro_batch_size)


def _check_entries(entries, steps: int, path: str) -> None:
    previous = -1
    for i, entry in enumerate(entries):
        if entry.seq_len <= 0:
            raise UserValueError(f"{path}[{i}].seq_len={entry.seq_len} must be > 0")
        if entry.step < 0:
            raise UserValueError(f"{path}[{i}].step={entry.step} must be >= 0")
        if entry.step <= previous:
            raise UserValueError(f"{path}[{i}].step={entry.step} must be greater than "
                                 f"{path}[{i - 1}].step={previous} (stages in increasing steps)")
        if entry.step >= steps:
            raise UserValueError(f"{path}[{i}].step={entry.step} is not below train.steps="
                                 f"{steps}: the stage would never run")
        previous = entry.step


def _check_layout(cfg, path: str) -> None:
    """What the schedule was built and tested for: the text job, flat (non-pipelined) models,
    the FSDP/DDP engine."""
    if cfg.data.kind != "text":
        raise UserValueError(f"{path} is supported for data.kind=text only, not "
                             f"data.kind={cfg.data.kind!r}")
    if cfg.parallel.pp > 1:
        raise UserValueError(f"{path} does not work with parallel.pp={cfg.parallel.pp}: pipeline "
                             f"schedules are built for one micro-batch shape; use parallel.pp=1")
    if cfg.parallel.engine == "deepspeed":
        raise UserValueError(f"{path} is not supported with parallel.engine=deepspeed (its "
                             f"micro-batch size is fixed at start); use parallel.engine=fsdp")


def _check_rope_reach(name: str, seq_len: int, scaling) -> None:
    """Linear, YaRN and Llama-3 scaling reach original_max_seq_len × factor positions."""
    if scaling is None or scaling.type not in _BOUNDED_SCALINGS:
        return
    reach = int(scaling.original_max_seq_len * scaling.factor)
    if seq_len > reach:
        raise UserValueError(
            f"{name}={seq_len} exceeds the reach of model.rope_scaling (type={scaling.type}): "
            f"original_max_seq_len={scaling.original_max_seq_len} × factor={scaling.factor} = "
            f"{reach}; raise model.rope_scaling.factor")


def _check_scaling_trained(path: str, last_seq_len: int, scaling) -> None:
    """Under a schedule the scaling applies only beyond original_max_seq_len; a run whose last
    stage stays within it would never train the scaled frequencies that the saved model (and
    every export of it) applies at inference."""
    if last_seq_len <= scaling.original_max_seq_len:
        raise UserValueError(
            f"{path}: the last stage's seq_len={last_seq_len} does not exceed "
            f"model.rope_scaling.original_max_seq_len={scaling.original_max_seq_len}, so "
            f"model.rope_scaling would never be trained; lengthen the last stage or set "
            f"model.rope_scaling=null")


def _check_rows(lengths: list[tuple[str, int]], micro_batch_size: int) -> None:
    """keep_tokens_per_step: every stage's length must divide the step-0 micro-batch's tokens."""
    first_name, first = lengths[0]
    tokens = micro_batch_size * first
    for name, seq_len in lengths[1:]:
        if tokens % seq_len:
            raise UserValueError(
                f"{name}={seq_len} does not divide the {tokens} tokens of a micro-batch "
                f"(train.micro_batch_size={micro_batch_size} × {first_name}={first}) that "
                f"train.keep_tokens_per_step=true keeps; pick a length that divides {tokens} "
                f"or set train.keep_tokens_per_step=false")
