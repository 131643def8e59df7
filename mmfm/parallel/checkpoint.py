"""Distributed checkpoints (torch.distributed.checkpoint) that resume under another layout.

Layout on disk: `<run>/checkpoints/step_00000100/` holds DCP's files (`.metadata`,
`__<rank>_0.distcp`) plus `meta.json` (step, layout, model config, SHA-256 of every file), so
`mmfm.train.checkpoint.verify_checkpoint` checks its integrity like a single-process one. It is
written into `.tmp_step_*` and renamed by rank 0 once every rank has finished.

Every tensor is saved under the name it has in the unsharded Decoder, in a form that does not
depend on the layout:

- FSDP / tensor-parallel weights are DTensors: DCP stores their shards with global offsets and
  reshards them on load into whatever placements the new layout has;
- DeepSpeed ZeRO weights and optimizer moments are gathered to full tensors (DeepSpeed's
  `safe_get_full_*` helpers; memory: one full tensor at a time per rank) and loaded back with
  `safe_set_full_*`;
- expert-parallel experts are saved one expert per key (`...experts.w1#5`; a modality group's
  `...ffn.groups.image.experts.w1#1`), so any ep reads exactly the experts it holds;
- plain replicated tensors are written once (DCP deduplicates equal keys).

Optimizer state is AdamW's `exp_avg`, `exp_avg_sq` and `step` per weight; the LR schedule
position is `meta.json`'s `scheduler_last_epoch`. Data loader positions (per data-parallel rank)
and RNG states (per rank) are gathered to rank 0 and written as one `objects.json`: the DCP
files hold tensors only and every file is read without unpickling anything (DCP loads tensors
with `weights_only=True`; this module never asks DCP for pickled objects). Loader positions are
restored when dp is unchanged, RNG states when the whole layout is.

The same format serves one process (world size 1, a trivial layout) and N.

Stacked experts (converted on read): multimodal checkpoints written before modality groups'
experts counted as routed experts hold a group's whole stack (and its moments) under one key
(`...ffn.groups.image.experts.w1`, shape (E_g, ...)). `load_distributed` sees that in the DCP
metadata (the plain key is there, the `#k` keys are not), reads the full stack and keeps this
rank's experts [first, first + local), for the weight and its AdamW moments, under any engine
but DeepSpeed (which cannot train a multimodal model, so never wrote that form; its path is the
same but untested). Memory: every such stack whole on every rank (CPU) during that load. The
format version stays 2: both forms were written as version 2, so a version cannot tell them
apart, and the metadata can. `Checkpoint.model_state` (one process) reads every key as stored,
so it reads both forms.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from mmfm.parallel.api import ParallelModel
from mmfm.parallel.expert_parallel import is_routed_expert
from mmfm.parallel.state import unshard
from mmfm.train.checkpoint import (
    META_FILE,
    CheckpointError,
    _fsync_dir,
    _sha256,
)
from mmfm.train.diskfull import DISK_FULL_ERRNOS, disk_full_error, folder_bytes

FORMAT = "mmfm-dcp"
FORMAT_VERSION = 2  # 1: objects and scheduler were pickled inside the DCP files
OBJECTS_FILE = "objects.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
# Model config fields that decide tensor shapes (a checkpoint must agree on all of them).
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
                "tie_embeddings", "qk_norm", "qkv_bias")
MOE_SHAPE_FIELDS = ("num_experts", "expert_hidden", "num_shared_experts", "shared_expert_hidden",
                    "every", "first_dense", "shared_expert_gate")
# What a checkpoint written before a field existed had (the field's default then).
FIELD_DEFAULTS = {"qk_norm": "none", "qkv_bias": False, "shared_expert_gate": False}


@dataclass
class LoadedCheckpoint:
    step: int
    meta: dict[str, Any]
    objects: dict[str, Any]  # loader position, rng, ... (what this rank could restore)


def layout_of(pm: ParallelModel) -> dict[str, Any]:
    d = pm.dims
    return {"pp": d.pp, "dp": d.dp, "cp": d.cp, "tp": d.tp, "ep": d.ep, "engine": pm.cfg.engine,
            "zero_stage": pm.cfg.stage, "world_size": d.world_size}


# ----------------------------------------------------------------------------- state dicts

def _init_optimizer_state(pm: ParallelModel, optimizer) -> None:
    """Create AdamW's state before the first step, so a template exists to load into."""
    for p in _optimizer_params(pm, optimizer):
        if not optimizer.state[p]:
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    if pm.engine is not None:  # let DeepSpeed map each weight to its new state fragments
        from mmfm.parallel.api import _relink_deepspeed_optimizer_state

        _relink_deepspeed_optimizer_state(pm.engine, force=True)


def _optimizer_params(pm: ParallelModel, optimizer) -> list[Tensor]:
    """The tensors AdamW keeps state for: the weights, or DeepSpeed's flat fp32 partitions
    (ZeRO-1/2: one per param group; ZeRO-3: one per sub-group, swapped into the groups only
    during its step)."""
    if pm.engine is None:
        return [p for g in optimizer.param_groups for p in g["params"]]
    zero = pm.engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    return list(flats if flats is not None else zero.single_partition_of_fp32_groups)


def _deepspeed_step(optimizer) -> Tensor:
    for state in optimizer.state.values():
        if "step" in state:
            return torch.as_tensor(state["step"], dtype=torch.float32).clone()
    return torch.tensor(0.0)


class _Entry:
    """One saved weight: how to read it for saving and where to put it after loading."""

    def __init__(self, pm: ParallelModel, name: str, param: Tensor, optimizer) -> None:
        self.pm, self.name, self.param, self.optimizer = pm, name, param, optimizer
        self.expert = is_routed_expert(name)  # saved one expert per key, whatever the ep
        # Keys whose checkpoint holds the whole expert stack under the plain name (see the
        # module docstring): {key: global size}. Set by load_distributed from DCP's metadata.
        self.stacked_on_disk: dict[str, torch.Size] = {}
        self.deepspeed = pm.engine is not None

    def _value(self, key: str | None) -> Tensor:
        """The weight (key None) or its AdamW moment `key`, as a tensor DCP can save and load
        into: the weight's own storage where possible, else a full copy put back after loading
        (DeepSpeed's partitions, FSDP-sharded expert stacks that are saved per expert)."""
        if self.deepspeed:
            return unshard(self.pm, self.param, key)
        t = self.param if key is None else self.optimizer.state[self.param][key]
        if isinstance(t, DTensor) and self.expert:
            with torch.no_grad():
                return t.full_tensor().detach().clone()
        return t.detach() if isinstance(t, DTensor) else t.data

    def _keys(self, prefix: str) -> list[str]:
        if not self.expert:
            return [prefix]
        lo = self._first_expert()
        n = self._local_experts()
        return [f"{prefix}#{lo + e}" for e in range(n)]

    def _first_expert(self) -> int:
        if self.pm.dims.ep == 1:
            return 0
        return dist.get_rank(self.pm.dims.ep_group) * self._local_experts()

    def _local_experts(self) -> int:
        # DTensor: the global shape of this rank's E/ep stack; ZeRO-3: the unpartitioned shape.
        return getattr(self.param, "ds_shape", self.param.shape)[0]

    def state(self) -> tuple[dict[str, Tensor], list]:
        """({key: tensor}, [(what `key` is, the tensor that was loaded, the whole saved stack
        DCP reads into when the checkpoint holds one, else None)])."""
        out, fixups = {}, []
        kinds = [("model." + self.name, None)]
        kinds += [(f"optim.{self.name}.{m}", m) for m in MOMENTS]
        for prefix, key in kinds:
            value = self._value(key)
            stack = None
            if prefix in self.stacked_on_disk:
                stack = out[prefix] = torch.empty(self.stacked_on_disk[prefix], dtype=value.dtype)
            elif self.expert:
                for k, piece in zip(self._keys(prefix), value.unbind(0), strict=True):
                    out[k] = piece
            else:
                out[prefix] = value
            fixups.append((key, value, stack))
        out[f"optim.{self.name}.step"] = self._step()
        return out, fixups

    def _step(self) -> Tensor:
        if self.deepspeed:
            return _deepspeed_step(self.optimizer)
        return self.optimizer.state[self.param]["step"]

    @torch.no_grad()
    def put_back(self, fixups: list, step: Tensor) -> None:
        """After DCP loaded into the tensors of `state()`: copy where in-place was impossible."""
        for key, value, stack in fixups:
            if stack is not None:  # this rank's experts of the whole saved stack
                first = self._first_expert()
                value.copy_(stack[first:first + self._local_experts()])
            if self.deepspeed:
                from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

                if key is None:
                    safe_set_full_fp32_param(self.param, value)
                else:
                    safe_set_full_optimizer_state(self.param, value, key)
                continue
            target = self.param if key is None else self.optimizer.state[self.param][key]
            if isinstance(target, DTensor) and self.expert:  # FSDP-sharded expert stack
                shard = distribute_tensor(value, target.device_mesh, target.placements,
                                          src_data_rank=None)
                target.to_local().copy_(shard.to_local())
        if self.deepspeed:
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = step.clone() if torch.is_tensor(state["step"]) else float(step)
        else:
            self.optimizer.state[self.param]["step"] = step.clone()


def _entries(pm: ParallelModel, optimizer) -> list[_Entry]:
    return [_Entry(pm, name, param, optimizer) for name, param in pm.named_parameters()]


def _state(pm: ParallelModel, optimizer, saved: dict[str, Any] | None = None,
           path: Path | None = None):
    """{key: tensor} of every weight, AdamW moment and step, and persistent buffer. `saved`:
    the DCP metadata of the checkpoint `path` to load (expert stacks it holds under one key are
    read whole, see the module docstring)."""
    state: dict[str, Any] = {}
    fixups = []
    for entry in _entries(pm, optimizer):
        if entry.expert and saved:
            entry.stacked_on_disk = _stacked_experts(entry, saved, path)
        values, fix = entry.state()
        state.update(values)
        fixups.append((entry, fix, values[f"optim.{entry.name}.step"]))
    for name, buf in pm.named_buffers():
        state["model." + name] = buf
    return state, fixups


def _stacked_experts(entry: _Entry, saved: dict[str, Any], path: Path | None
                     ) -> dict[str, torch.Size]:
    """{key: global size} of the entry's weight and moments that `saved` (DCP metadata) holds
    as one whole stack (the form before per-expert keys); a stack whose expert shape or count
    does not fit this model is refused here, naming the key."""
    out = {}
    local = tuple(getattr(entry.param, "ds_shape", entry.param.shape))
    for key in ["model." + entry.name] + [f"optim.{entry.name}.{m}" for m in MOMENTS]:
        if key not in saved:
            continue
        size = saved[key].size
        if tuple(size[1:]) != local[1:] or size[0] < entry._first_expert() + local[0]:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: {key} has shape {tuple(size)}, "
                f"this model's experts {local[1:]} ({local[0]} on this rank of "
                f"ep={entry.pm.dims.ep})")
        out[key] = size
    return out


def _restore_scheduler(scheduler, last_epoch: int) -> None:
    """Set the schedule position; the group count may differ between layouts, so the LRs are
    recomputed (LambdaLR.step sets every group to base_lr × lambda(last_epoch))."""
    scheduler.last_epoch = last_epoch - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


# ----------------------------------------------------------------------------- save / load

def save_distributed(path: str | Path, pm: ParallelModel, optimizer, scheduler, step: int,
                     meta: dict[str, Any], objects: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint into the folder `path` (collective), through a temporary folder
    renamed into place by rank 0. `objects`: this rank's JSON-serializable extras (loader
    position, RNG), keyed uniquely. Pruning and lineage are the trainer's (run_control)."""
    final = Path(path)
    tmp = final.parent / f".tmp_{final.name}"
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _init_optimizer_state(pm, optimizer)
    state, _ = _state(pm, optimizer)
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except BaseException as err:  # DCP reports a writer's OSError as a CheckpointException
        if not _disk_full(err):
            raise
        written = folder_bytes(tmp)
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(final, written, None) from None
    gathered = _gather_objects(objects or {})
    dist.barrier()
    if rank0:
        (tmp / OBJECTS_FILE).write_text(json.dumps(gathered))
        hashes = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                     "scheduler_last_epoch": scheduler.last_epoch, "layout": layout_of(pm),
                     "sha256": hashes, **meta}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1))
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    dist.barrier()
    return final


def _disk_full(err: BaseException) -> bool:
    """Whether `err` (or, for DCP's CheckpointException, a rank's failure) is ENOSPC/EDQUOT."""
    failures = [pair[0] for pair in getattr(err, "failures", {}).values()]  # (exception, trace)
    causes = [err, *failures, err.__cause__, err.__context__]
    return any(isinstance(c, OSError) and c.errno in DISK_FULL_ERRNOS for c in causes)


def _gather_objects(mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's extras merged on rank 0 (tensor-parallel ranks hold the same loader key)."""
    if dist.get_world_size() == 1:
        return dict(mine)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a DCP checkpoint; a legacy single-process checkpoint is named as such."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META_FILE} (incomplete write?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is corrupt") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is a single-process checkpoint (model.safetensors + state.pt) "
            f"of an older mmfm; resume it on one process without a parallel layout (it is "
            f"converted on read), or start from its weights with train.init_from={path}")
    return meta


def check_compatible(path: Path, meta: dict[str, Any], model_cfg) -> None:
    """Raise CheckpointError naming the first model field the checkpoint disagrees on."""
    saved = (meta.get("config") or {}).get("model")
    if saved is None:
        return
    mine = model_cfg if isinstance(model_cfg, dict) else _as_dict(model_cfg)
    for name in SHAPE_FIELDS:
        if saved.get(name, FIELD_DEFAULTS.get(name)) != mine.get(name):
            raise CheckpointError(
                f"checkpoint {path} ({META_FILE}) was written for model.{name}={saved.get(name)}, "
                f"but this run has model.{name}={mine.get(name)}")
    s_moe, m_moe = saved.get("moe"), mine.get("moe")
    if (s_moe is None) != (m_moe is None):
        raise CheckpointError(
            f"checkpoint {path} ({META_FILE}) was written for "
            f"{'a dense' if s_moe is None else 'an MoE'} model, this run's model.moe is "
            f"{'null' if m_moe is None else 'set'}")
    for name in MOE_SHAPE_FIELDS if s_moe else ():
        if s_moe.get(name, FIELD_DEFAULTS.get(name)) != m_moe.get(name):
            raise CheckpointError(
                f"checkpoint {path} ({META_FILE}) was written for model.moe.{name}="
                f"{s_moe.get(name)}, but this run has model.moe.{name}={m_moe.get(name)}")


def _as_dict(cfg) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


@torch.no_grad()
def _refresh_deepspeed_weights(engine) -> None:
    """`safe_set_full_fp32_param` sets DeepSpeed's fp32 master copy only; copy it into the
    weights the forward uses (ZeRO-1/2: all-gathered flat groups, ZeRO-3: local partitions)."""
    zero = engine.optimizer
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        for i in range(len(flats)):
            zero._reassign_or_swap_out_partitioned_parameters(i)
    else:
        zero.update_lp_params()


def load_distributed(path: str | Path, pm: ParallelModel, optimizer, scheduler,
                     objects: dict[str, Any] | None = None) -> LoadedCheckpoint:
    """Load a checkpoint into this layout (collective). `objects` names the extras this rank
    wants restored (loader, rng); only those present are returned."""
    path = Path(path)
    meta = read_meta(path)
    check_compatible(path, meta, pm.model_cfg)
    _init_optimizer_state(pm, optimizer)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state, fixups = _state(pm, optimizer, saved, path)
    saved_keys = set(saved)
    missing = sorted(k for k in state if k not in saved_keys)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}")
    dcp.load(state, checkpoint_id=str(path))
    for entry, fix, step in fixups:
        entry.put_back(fix, step)
    if pm.engine is not None:
        _refresh_deepspeed_weights(pm.engine)
    _restore_scheduler(scheduler, int(meta.get("scheduler_last_epoch", meta["step"])))
    extras = read_objects(path)
    found = {k: extras[k] for k in (objects or {}) if k in extras}
    return LoadedCheckpoint(int(meta["step"]), meta, found)


def read_objects(path: Path) -> dict[str, Any]:
    """The extras of a checkpoint (JSON; a format-1 checkpoint kept them pickled: none)."""
    file = Path(path) / OBJECTS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}
