"""`mmfm launch`: print (or run) the command that starts a training config on a cluster shape.

- one node: `torchrun --standalone --nproc-per-node G -m mmfm.cli train CONFIG ...`, or the
  DeepSpeed launcher (`--launcher deepspeed`);
- several nodes: `sbatch` of `launchers/slurm.sbatch` (which derives the rendezvous host and
  port from the allocation and runs one torchrun per node), or, with `--launcher torchrun`, the
  torchrun command to run on each node by hand.

The layout is checked against the world size first, so a misfit fails here, not on the cluster.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mmfm.errors import UserValueError

LAUNCHERS_DIR = Path(__file__).resolve().parents[2] / "launchers"
LAUNCHERS = ("torchrun", "deepspeed", "slurm")


def _quote(args: list[str]) -> str:
    """Shell-quoted, except that `$VAR:port` stays expandable."""
    return " ".join(f'"{a}"' if a.startswith("$") and "'" not in a else shlex.quote(a)
                    for a in args)


def train_args(config: str, overrides: list[str]) -> list[str]:
    return ["-m", "mmfm.cli", "train", config, *overrides]


def torchrun_command(config: str, overrides: list[str], nodes: int, per_node: int,
                     node_rank: int | str = 0, master: str = "$MASTER_ADDR",
                     port: int | str = 29500) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        cmd += ["--standalone", "--nproc-per-node", str(per_node)]
    else:
        cmd += ["--nnodes", str(nodes), "--nproc-per-node", str(per_node),
                "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{master}:{port}"]
    return cmd + train_args(config, overrides)


def deepspeed_command(config: str, overrides: list[str], per_node: int) -> list[str]:
    # --no_local_rank: the rank comes from the environment, as under torchrun.
    return ["deepspeed", "--num_gpus", str(per_node), "--no_local_rank", "--module", "mmfm.cli",
            "train", config, *overrides]


def slurm_command(config: str, overrides: list[str], nodes: int, per_node: int) -> list[str]:
    script = LAUNCHERS_DIR / "slurm.sbatch"
    if not script.is_file():
        raise UserValueError(f"{script} not found: the SLURM launcher lives in the repository's "
                         f"launchers/ folder (not installed with the wheel)")
    return ["sbatch", f"--nodes={nodes}", f"--gpus-per-node={per_node}", str(script), config,
            *overrides]


def check_layout(config: str, overrides: list[str], world: int) -> str:
    """Validate the config for this world size; a one-line description of the layout."""
    from mmfm.config import ConfigError, load_config

    cfg = load_config(config, overrides)
    try:
        cfg.parallel.validate("parallel", cfg.model, world_size=world, train_cfg=cfg.train)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    p = cfg.parallel
    cp = f" × cp {p.cp}" if p.cp > 1 else ""
    return (f"world {world} = pp {p.pp} × dp {p.resolved_dp(world)}{cp} × tp {p.tp}, ep {p.ep}, "
            f"engine {p.engine} (ZeRO stage {p.stage})")


def commands(args: argparse.Namespace) -> list[list[str]]:
    launcher = args.launcher or ("torchrun" if args.nodes == 1 else "slurm")
    if launcher == "deepspeed":
        if args.nodes > 1:
            raise UserValueError("--launcher deepspeed supports one node here; use --launcher slurm "
                             "for several nodes")
        return [deepspeed_command(args.config, args.overrides, args.gpus_per_node)]
    if launcher == "slurm":
        return [slurm_command(args.config, args.overrides, args.nodes, args.gpus_per_node)]
    return [torchrun_command(args.config, args.overrides, args.nodes, args.gpus_per_node, node,
                             args.master_addr, args.master_port)
            for node in range(args.nodes)]


def cmd_launch(args: argparse.Namespace) -> int:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserValueError("--nodes and --gpus-per-node must be >= 1")
    world = args.nodes * args.gpus_per_node
    print(f"# {check_layout(args.config, args.overrides, world)}")
    cmds = commands(args)
    for node, cmd in enumerate(cmds):
        if len(cmds) > 1:
            print(f"# on node {node}:")
        print(_quote(cmd))
    if not args.run:
        return 0
    if len(cmds) > 1:
        raise UserValueError("--run starts one command; run the per-node commands on each node, "
                         "or use --launcher slurm")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmds[0], env=env)


def register(sub) -> None:
    """Add `mmfm launch` to the CLI's subparsers."""
    p = sub.add_parser(
        "launch", help="print or run the command that trains a config on N nodes × G devices",
        description="Check a config's parallel layout against the cluster shape and print the "
                    "launch command (torchrun on one node, SLURM sbatch on several); --run "
                    "executes it. On CPU, --gpus-per-node is the number of processes (gloo).")
    p.add_argument("config", help="YAML preset, e.g. configs/text_moe_tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="dotted overrides, forwarded to every rank")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1,
                   help="processes per node: GPUs, or CPU processes (default 1)")
    p.add_argument("--launcher", choices=LAUNCHERS,
                   help="default: torchrun on one node, slurm on several")
    p.add_argument("--master-addr", default="$MASTER_ADDR",
                   help="rendezvous host for multi-node torchrun (default $MASTER_ADDR)")
    p.add_argument("--master-port", default=29500, type=int, help="rendezvous port")
    p.add_argument("--run", action="store_true", help="run the command instead of printing it")
    p.set_defaults(func=cmd_launch)
