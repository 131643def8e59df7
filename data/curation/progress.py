"""Progress of the long data commands: live bars (tqdm) and one summary line per stage.

Bars go to stderr and only when it is a terminal (tqdm's ``disable=None``), so logs and
tests stay clean; summary lines are always printed. Stage-1 and dedup tasks run in other
processes (or on a cluster): each task writes its running document count to a small file
(:func:`write_count`) and a thread in the driver sums them (:class:`TaskArrayProgress`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
WRITE_EVERY_S = 1.0


def summary_line(stage: str, docs: int | None, seconds: float, detail: str = "") -> str:
    """``curate | stage: N docs in S s (R docs/s); detail`` -- printed when a stage ends."""
    rate = f" ({docs / seconds:,.0f} docs/s)" if docs is not None and seconds > 0 else ""
    count = f"{docs:,} docs in " if docs is not None else ""
    return f"{stage}: {count}{seconds:.1f} s{rate}" + (f"; {detail}" if detail else "")


def print_summary(stage: str, docs: int | None, seconds: float, detail: str = "",
                  file: IO[str] | None = None) -> None:
    print(summary_line(stage, docs, seconds, detail), file=file or sys.stderr, flush=True)


def iter_progress(items: Iterable[T], desc: str, total: int | None = None,
                  file: IO[str] | None = None, disable: bool | None = None) -> Iterator[T]:
    """`items` with a docs/s + ETA bar (ETA when `total` is known)."""
    yield from tqdm(items, desc=desc, total=total, unit="doc", file=file or sys.stderr,
                    disable=disable, dynamic_ncols=True, smoothing=0.1)


class CountWriter:
    """A task's running document count in ``path``, rewritten at most once a second."""

    def __init__(self, path: Path):
        self.path, self.count, self._last = path, 0, 0.0

    def add(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= WRITE_EVERY_S:
            self.flush()
            self._last = now

    def flush(self) -> None:
        write_count(self.path, self.count)


def write_count(path: Path, count: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(count))
    os.replace(tmp, path)


def read_counts(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += int(p.read_text() or 0)
        except (OSError, ValueError):  # not written yet
            pass
    return total


class TaskArrayProgress:
    """A bar over the tasks of an array run elsewhere (ETA from finished tasks), with the
    documents seen so far and their rate from the tasks' count files; a summary line at
    the end. Use as a context manager around ``executor.run()``."""

    def __init__(self, stage: str, tasks: int, done: Callable[[], int],
                 docs: Callable[[], int] | None = None, file: IO[str] | None = None,
                 disable: bool | None = None, interval_s: float = 0.5):
        self.stage, self.tasks, self.done, self.docs = stage, tasks, done, docs
        self.file = file or sys.stderr  # taken now: the executor may redirect stderr later
        self.disable, self.interval_s = disable, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.started = 0.0

    def __enter__(self) -> TaskArrayProgress:
        self.started = time.monotonic()
        self.bar = tqdm(total=self.tasks, desc=self.stage, unit="task", file=self.file,
                        disable=self.disable, dynamic_ncols=True)
        self.bar.update(self.done())
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._refresh()

    def _refresh(self) -> None:
        self.bar.update(self.done() - self.bar.n)
        if self.docs is not None:
            n = self.docs()
            rate = n / max(time.monotonic() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{n:,} docs, {rate:,.0f} docs/s", refresh=False)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.bar.close()
        if kind is None:
            docs = self.docs() if self.docs is not None else None
            print_summary(self.stage, docs, time.monotonic() - self.started,
                          f"{self.done()}/{self.tasks} tasks", file=self.file)
