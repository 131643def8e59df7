"""Read a shard's tar members without trusting the tar: damage is an error naming the byte.

Python's `tarfile` treats an unreadable header after the first member as the end of the
archive, so garbage in the middle of a shard used to end it silently (40 of 100 documents
read, nothing counted). `iter_tar_files` checks, when tarfile stops, that only the zero blocks
of a proper end-of-archive follow; anything else is a `ShardError` naming the shard and the
byte offset of the damage. Truncated member data and files that are not tars at all (random
bytes, empty) get the same one-line treatment instead of a tarfile traceback. Member names
that are absolute or climb out with `..` are reported to the caller (`unsafe_member`), never
used as paths.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from mmfm.errors import UserValueError

_TAIL_CHUNK = 1 << 16
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks close every tar


class ShardError(UserValueError):
    """A shard that cannot be read as a tar (missing, not a tar, truncated, damaged), or whose
    contents disagree with its index; the message names the shard and, where known, the byte."""


def unsafe_member(name: str) -> bool:
    """Whether a tar member name is absolute or has a `..` component."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or name.startswith("\\")


def iter_tar_files(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each regular file in the tar at `path`, in stored order.

    Raises ShardError (after yielding the members before the damage) when the file is missing,
    is not a tar, breaks off inside a member, or holds anything but zero blocks after the
    header where tarfile stopped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as err:
        raise ShardError(f"shard {path} cannot be opened ({err.strerror or err})") from None
    try:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as err:
            raise ShardError(f"shard {path} is not a tar file (damaged at byte 0: {err})") from None
        yield from _members(tar, path)
        _check_tail(f, tar.offset, path)
    finally:
        f.close()


def _members(tar: tarfile.TarFile, path: str | Path) -> Iterator[tuple[str, bytes]]:
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as err:
            raise ShardError(f"shard {path}: damaged tar header at byte {tar.offset} ({err})") from None
        if member is None:
            return
        if not member.isfile():
            continue
        try:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ShardError(f"shard {path}: member {member.name!r} at byte {member.offset} is "
                             f"truncated ({err})") from None
        yield member.name, data


def _check_tail(f, offset: int, path: str | Path) -> None:
    """After the last member tarfile read, a proper archive holds only zero blocks, at least
    the two of the end-of-archive marker (a file cut at a member boundary lacks them)."""
    f.seek(offset)
    position = offset
    while chunk := f.read(_TAIL_CHUNK):
        stripped = chunk.lstrip(b"\0")
        if stripped:
            at = position + len(chunk) - len(stripped)
            raise ShardError(f"shard {path}: damaged tar header at byte {offset} (tar would "
                             f"silently stop there; non-zero data at byte {at})")
        position += len(chunk)
    if position - offset < END_OF_ARCHIVE:
        raise ShardError(f"shard {path} is truncated at byte {position} (no end-of-archive "
                         "marker)")
