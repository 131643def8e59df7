"""Dead-rank detection: every rank heartbeats through the rendezvous store, and a rank whose
heartbeat stops is named by the others, which then exit instead of waiting in a collective.

Why: when a rank dies, its peers block in their next collective until the process-group timeout
(30 minutes by default) and then fail with a message that names no rank. Here a daemon thread
on every rank bumps `hb/<rank>` in the TCPStore that torchrun (or rank 0) already hosts, and
watches the other ranks' counters; a counter that has not moved for `timeout_s`, from a rank
that has not said it finished, means that rank is gone. The thread then prints
`error: rank 3 (host, pid 1234) stopped responding ...` and ends the process with exit code 3,
since the main thread may be stuck in a collective that nothing else can interrupt. If the
store itself disappears, the rank hosting it (rank 0, or the torchrun agent) is named instead.

`wait_for_dead` lets the main thread, when a collective raised (gloo reports a closed
connection at once), name the rank before re-raising.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from mmfm.errors import MmfmError

EXIT_CODE = 3


class RankFailure(MmfmError, RuntimeError):
    """Another rank of the run died or stopped responding."""


class RankWatchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None,
                 interval_s: float | None = None, exit_on_failure: bool = True,
                 prefix: str = "mmfm_watchdog") -> None:
        self.rank, self.world, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = interval_s or max(0.2, min(2.0, timeout_s / 5))
        self.exit_on_failure = exit_on_failure
        self.store = dist.PrefixStore(prefix, store or _store_client(timeout_s))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict[int, tuple[str | None, float]] = {}
        self.dead: list[int] = []
        self.reason = ""

    def start(self) -> RankWatchdog:
        self.store.set(f"who/{self.rank}", f"{socket.gethostname()}, pid {os.getpid()}")
        self._beat(0)
        now = time.monotonic()
        self._last = {r: (None, now) for r in range(self.world) if r != self.rank}
        self._thread = threading.Thread(target=self._run, name="mmfm-rank-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank finished normally: peers stop watching it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval_s * 5)
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # the store may already be gone at shutdown; nothing to report
            pass
        self._thread = None

    def _beat(self, n: int) -> None:
        self.store.set(f"hb/{self.rank}", str(n))

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval_s):
            n += 1
            try:
                self._beat(n)
                dead = self._check()
            except Exception as err:  # the store is gone: its host died
                self._fail([0], f"lost the rendezvous store ({type(err).__name__}: {err}); "
                                f"the process hosting it (rank 0 or the launcher) has died")
                return
            if dead:
                self._fail(dead, self._describe(dead))
                return

    def _check(self) -> list[int]:
        now = time.monotonic()
        others = sorted(self._last)
        beats = self.store.multi_get([f"hb/{r}" for r in others])
        dead = []
        for r, raw in zip(others, beats, strict=True):
            value = raw.decode()
            seen, since = self._last[r]
            if value != seen:
                self._last[r] = (value, now)
            elif now - since > self.timeout_s and not self._finished(r):
                dead.append(r)
        return dead

    def _finished(self, r: int) -> bool:
        return self.store.check([f"done/{r}"])

    def _describe(self, dead: list[int]) -> str:
        parts = []
        for r in dead:
            try:
                who = self.store.get(f"who/{r}").decode() if self.store.check([f"who/{r}"]) else "?"
            except Exception:
                who = "?"
            parts.append(f"rank {r} ({who})")
        return (f"{', '.join(parts)} stopped responding: no heartbeat for more than "
                f"{self.timeout_s:g}s (parallel.rank_timeout_s); it died or hangs")

    def _fail(self, dead: list[int], reason: str) -> None:
        self.dead, self.reason = dead, reason
        if self.exit_on_failure:
            print(f"error: [rank {self.rank}] {reason}; exiting", file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)

    def wait_for_dead(self, timeout_s: float | None = None) -> list[int]:
        """Block until a failed rank is identified or `timeout_s` passes; the failed ranks."""
        deadline = time.monotonic() + (self.timeout_s * 2 + 2 if timeout_s is None else timeout_s)
        while not self.dead and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.1)
        return self.dead


def _store_client(timeout_s: float):
    """A client of the rendezvous TCPStore at MASTER_ADDR:MASTER_PORT (torchrun's or rank 0's)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return dist.TCPStore(host, port, is_master=False,
                         timeout=timedelta(seconds=max(timeout_s, 10.0)))


def explain_failure(watchdog: RankWatchdog | None, rank: int, err: BaseException) -> None:
    """Call from an `except` around distributed work: when `err` came from a dead peer (gloo
    reports a closed connection at once), raise RankFailure naming that peer instead."""
    if watchdog is None or isinstance(err, (ValueError, RankFailure)):
        return
    watchdog.exit_on_failure = False
    if watchdog.wait_for_dead():
        raise RankFailure(f"[rank {rank}] {watchdog.reason}") from err
