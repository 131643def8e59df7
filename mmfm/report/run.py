"""Reading a run folder for the reports: its config, its metrics.jsonl, its routing records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmfm.errors import UserValueError


class RunFolderError(UserValueError):
    """A run folder (or one of its files) the reports cannot use; the message names it."""


def run_config(run_dir: Path):
    """The run's resolved config (config.yaml, written by `mmfm train`)."""
    from mmfm.config import load_config

    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: is {run_dir} a run folder of `mmfm train`?")
    return load_config(path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records in file order. A last line cut short (a run still writing) is
    skipped; a bad line anywhere else is an error naming the file and line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: the run has logged nothing yet")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # being written right now
            raise RunFolderError(f"{path} line {number} is not JSON") from None
        if not isinstance(row, dict) or "step" not in row:
            raise RunFolderError(f"{path} line {number} has no step")
        rows.append(row)
    return rows
