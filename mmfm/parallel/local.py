"""Run a function on N local processes joined by a gloo (or NCCL) process group, as torchrun
would, with a hard timeout: used by the multi-process tests and the layout benchmarks.

Each worker gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT on a free port), one intra-op thread, runs `fn(*args)`, and writes its return value
(or its traceback) to a file; the parent collects them. A worker that fails makes `spawn` raise
naming the rank; workers still alive at the deadline are killed and named. Workers end with
barrier → destroy_process_group → os._exit(0), since gloo sometimes aborts during interpreter
shutdown after a successful run.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _to_plain(result: Any) -> Any:
    """A dataclass result becomes a tagged dict, so the parent can load it with
    `weights_only=True` (no pickled classes) and rebuild it with `_from_plain`."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        fields = {f.name: _to_plain(getattr(result, f.name)) for f in dataclasses.fields(result)}
        return {"__dataclass__": f"{type(result).__module__}:{type(result).__qualname__}", **fields}
    if isinstance(result, (list, tuple)):
        return type(result)(_to_plain(v) for v in result)
    if isinstance(result, dict):
        return {k: _to_plain(v) for k, v in result.items()}
    return result


def _from_plain(value: Any) -> Any:
    if isinstance(value, dict) and "__dataclass__" in value:
        module, name = value.pop("__dataclass__").split(":")
        cls = getattr(importlib.import_module(module), name)
        assert dataclasses.is_dataclass(cls), f"{module}:{name} is not a dataclass"
        return cls(**{k: _from_plain(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_from_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _from_plain(v) for k, v in value.items()}
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple,
            timeout_s: float) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    from mmfm.parallel.mesh import init_distributed

    out = Path(out_dir)
    try:
        init_distributed(timeout_s)
        result = fn(*args)
        torch.save(_to_plain(result), out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # peers then fail in their next collective or hit the timeout
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        os._exit(0)


def spawn(fn: Callable, world: int, args: tuple = (), timeout_s: float = 120.0,
          grace_s: float = 1.0) -> list[Any]:
    """[fn's return value on rank r for r in range(world)]; raises RuntimeError naming the
    ranks that failed or did not finish within `timeout_s`. Once one rank fails, the others
    get `grace_s` to end on their own before they are killed."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mmfm_spawn_") as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, out_dir, fn, args,
                                                   min(timeout_s, 300.0)))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs):
                end = min(deadline, time.monotonic() + grace_s)  # peers report their own errors
                while time.monotonic() < end and any(p.is_alive() for p in procs):
                    time.sleep(0.05)
                break
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
        for p in procs:
            p.join(timeout=5)
        out = Path(out_dir)
        errors = {r: (out / f"rank{r}.err").read_text() for r in range(world)
                  if (out / f"rank{r}.err").is_file()}
        if errors or hung or any(p.exitcode != 0 for p in procs):
            first = min(errors) if errors else None
            lines = [f"ranks failed: {sorted(errors)}; did not finish in {timeout_s:.0f}s: {hung};"
                     f" exit codes {[p.exitcode for p in procs]}"]
            if first is not None:
                lines.append(f"rank {first}:\n{errors[first]}")
            raise RuntimeError("\n".join(lines))
        return [_from_plain(torch.load(out / f"rank{r}.pt", weights_only=True))
                for r in range(world)]
