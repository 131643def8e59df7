"""Disk full during a checkpoint write: one line with the path and sizes, no half-written folder.

    with checkpoint_write(final_dir) as tmp:   # tmp = <parent>/.tmp_<name>
        save files into tmp
    # on success tmp was renamed to final_dir; on ENOSPC/EDQUOT tmp is removed and a
    # DiskFullError says "no space left on device writing <final>: wrote 1.2 GiB, 0 B free on
    # <parent>"; the previous checkpoint stays the newest one, so it remains the resume point.

Any other error also removes the temporary folder and propagates unchanged.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmfm.errors import MmfmError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(MmfmError, OSError):
    """The filesystem ran out of space (or quota) while mmfm wrote a file."""


@contextmanager
def checkpoint_write(final: Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; rename it into place on success."""
    final = Path(final)
    tmp = final.parent / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as err:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(final, written, expected_bytes) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def disk_full_error(final: Path, written: int, expected_bytes: int | None) -> DiskFullError:
    """The one-line error: path, bytes written before it failed, expected size, free space."""
    free = _free_bytes(final.parent)
    need = f" of about {human_bytes(expected_bytes)}" if expected_bytes else ""
    where = f"{human_bytes(free)} free on {final.parent}" if free is not None else str(final.parent)
    err = DiskFullError(f"no space left on device writing {final}: wrote {human_bytes(written)}"
                        f"{need}, {where}; the previous checkpoint is still the resume point")
    err.errno = errno.ENOSPC
    return err


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 when it does not exist)."""
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
