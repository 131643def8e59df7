"""One base for user errors (as OLMo-core's `OLMoError`).

A `MmfmError` is something the user can fix: a bad config value, a missing or damaged file, a
package that is not installed. The CLI prints it as one line naming the field or file and exits
with status 2. Every other exception (a bug, or torch's own `ValueError`) keeps its traceback.

The concrete classes also derive from the builtin they replaced (`ValueError`, `RuntimeError`),
so callers that caught those keep working.
"""

from __future__ import annotations


class MmfmError(Exception):
    """A user error; the message is one line naming the field, file or package."""


class UserValueError(MmfmError, ValueError):
    """A value the user gave (config, flag, file content) that mmfm cannot use."""


class MissingDependencyError(MmfmError, ImportError):
    """An optional package a command needs is not installed; the message says which extra."""
