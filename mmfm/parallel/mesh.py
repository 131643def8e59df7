"""Process groups of one layout: `ParallelDims` holds the sizes and this rank's groups/meshes.

Rank layout (row-major, tp fastest): rank = ((pp_i · dp + dp_i) · cp + cp_i) · tp + tp_i, and
inside the data parallel dimension dp_i = edp_i · ep + ep_i. So

- a tensor-parallel group is tp consecutive ranks (the fastest links on a node),
- a context-parallel group is cp ranks tp apart (next fastest: it all-to-alls in every layer),
  sharing the data rows of one dp rank; the data-parallel reduction of replicated weights runs
  over the dp × cp ranks (`dp_cp`, as torchtitan's "dp_shard_cp"),
- an expert-parallel group is ep data-parallel ranks with the same (pp_i, tp_i, edp_i),
- an expert-data-parallel group is the dp/ep ranks that hold the same experts.

With tp = pp = 1 this is DeepSpeed's default MoE layout (expert-parallel groups [0,1],[2,3],
expert-data-parallel groups [0,2],[1,3]), and mmfm hands DeepSpeed these very groups.
Every group is created on every rank in the same order (a torch.distributed requirement).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mmfm.errors import UserValueError
from mmfm.parallel.config import ParallelConfig


@dataclass
class ParallelDims:
    """Sizes of the layout plus this rank's coordinates, process groups and device meshes."""

    pp: int
    dp: int
    tp: int
    ep: int
    rank: int
    device: torch.device
    mesh: DeviceMesh  # ("pp", "dp", "cp", "tp")
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    edp_mesh: DeviceMesh
    tied_group: dist.ProcessGroup | None  # first and last pipeline stage (tied embeddings)
    ep_ranks: list[int]
    edp_ranks: list[int]
    cp: int = 1  # context parallel: ranks sharing a sequence (last: keeps positional use valid)
    flat_dp_cp_mesh: DeviceMesh | None = None  # ("dp", "cp") flattened, when cp > 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dp * self.cp * self.tp)

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.cp * self.tp) % self.dp

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tp % self.cp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def dp_cp(self) -> int:
        """Ranks holding replicated (non-expert, non-tp-sharded) weights of one pipeline stage
        and tp rank: the data-parallel and the context-parallel ranks."""
        return self.dp * self.cp

    @property
    def dp_cp_mesh(self) -> DeviceMesh:
        """The dp × cp ranks as one dimension: FSDP shards and gradients average over it
        (the plain dp mesh when cp = 1, so those layouts are unchanged)."""
        return self.flat_dp_cp_mesh if self.flat_dp_cp_mesh is not None else self.mesh["dp"]

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        return self.dp_cp_mesh.get_group()

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("cp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("tp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def is_logging_rank(self) -> bool:
        """Global rank 0 logs; it sits on the first pipeline stage, so metrics from the last
        stage (the loss) are sent to it explicitly."""
        return self.rank == 0

    def describe(self) -> str:
        cp = f" × cp {self.cp}" if self.cp > 1 else ""
        return (f"world {self.world_size} = pp {self.pp} × dp {self.dp}{cp} × tp {self.tp}"
                f" (ep {self.ep} within dp)")


def rank_of(pp_i: int, dp_i: int, tp_i: int, dp: int, tp: int, cp_i: int = 0, cp: int = 1) -> int:
    return ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i


def expert_groups(pp: int, dp: int, tp: int, ep: int,
                  cp: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    """(expert-parallel groups, expert-data-parallel groups) as rank lists, in creation order
    (one set per context-parallel rank: cp > 1 runs with ep = 1, so these are then trivial)."""
    ep_groups, edp_groups = [], []
    edp = dp // ep
    for pp_i in range(pp):
        for cp_i in range(cp):
            for tp_i in range(tp):
                def rank(dp_i: int, pp_i=pp_i, tp_i=tp_i, cp_i=cp_i) -> int:
                    return rank_of(pp_i, dp_i, tp_i, dp, tp, cp_i, cp)

                for g in range(edp):
                    ep_groups.append([rank(g * ep + e) for e in range(ep)])
                for e in range(ep):
                    edp_groups.append([rank(g * ep + e) for g in range(edp)])
    return ep_groups, edp_groups


def tied_groups(pp: int, dp: int, tp: int, cp: int = 1) -> list[list[int]]:
    """Pairs (first stage, last stage) holding the same tied embedding shard."""
    return [[rank_of(0, d, t, dp, tp, c, cp), rank_of(pp - 1, d, t, dp, tp, c, cp)]
            for d in range(dp) for c in range(cp) for t in range(tp)]


def _subgroup(groups: list[list[int]], rank: int) -> tuple[dist.ProcessGroup, list[int]]:
    mine = None
    for ranks in groups:  # every rank creates every group, in the same order
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    assert mine is not None, f"rank {rank} is in none of {groups}"
    return mine


def build_dims(cfg: ParallelConfig, device: torch.device | None = None) -> ParallelDims:
    """Create this layout's meshes and groups (the default process group must exist)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg.validate("parallel", world_size=world)
    dp = cfg.resolved_dp(world)
    device = device or default_device()
    mesh = init_device_mesh(device.type, (cfg.pp, dp, cfg.cp, cfg.tp),
                            mesh_dim_names=("pp", "dp", "cp", "tp"))
    # torch asks callers to keep flattened meshes themselves (slicing them from the root mesh
    # is deprecated); no new groups when cp = 1, where the dp mesh serves.
    flat = mesh["dp", "cp"]._flatten("dp_cp") if cfg.cp > 1 else None
    ep_lists, edp_lists = expert_groups(cfg.pp, dp, cfg.tp, cfg.ep, cfg.cp)
    ep_group, ep_ranks = _subgroup(ep_lists, rank)
    edp_group, edp_ranks = _subgroup(edp_lists, rank)
    tied = None
    if cfg.pp > 1:
        tied, _ = _subgroup(tied_groups(cfg.pp, dp, cfg.tp, cfg.cp), rank)
    edp_mesh = DeviceMesh.from_group(edp_group, device.type, mesh=edp_ranks, mesh_dim_names=("edp",))
    return ParallelDims(cfg.pp, dp, cfg.tp, cfg.ep, rank, device, mesh, ep_group, edp_group,
                        edp_mesh, tied, ep_ranks, edp_ranks, cp=cfg.cp, flat_dp_cp_mesh=flat)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def launched_world_size() -> int:
    """Processes the launcher started (torchrun's WORLD_SIZE); 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the default process group: from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) when launched, NCCL for CUDA tensors plus gloo for CPU ones (gloo
    alone on CPU); one process started without a launcher gets a 1-rank group on an in-memory
    store (no port, no environment changes), so it runs the same code as N. Returns (rank,
    world size); a no-op when already initialized."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "RANK" not in os.environ and launched_world_size() == 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(default_device())
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return 0, 1
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise UserValueError(f"distributed run needs {', '.join(missing)} in the environment: "
                             f"launch it with torchrun or `mmfm launch`")
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def destroy_at_exit() -> None:
    """Destroy the process group before interpreter teardown (for the `mmfm train` process):
    gloo sometimes aborts when its sockets are torn down by the garbage collector after a
    successful run."""
    import atexit
    import sys

    def _destroy() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(_destroy)
