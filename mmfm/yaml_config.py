"""The one loader for YAML files with dotted overrides, shared by run configs
(`mmfm.config.load_config`), curation recipes and multimodal shard recipes.

OmegaConf structured configs do the parsing, type checking and unknown-key detection; this
module turns every failure into one line of the caller's error class naming the file and key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def read_yaml_mapping(path: str | Path, error: type[Exception], what: str = "config file") -> dict:
    """The top-level mapping of a YAML file; `error` (one line) when missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{what} {path}{where} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping at the top level, "
                    f"not {type(data).__name__}")
    return data


def merge_structured(schema: type[T], layers: Sequence[Any], overrides: Sequence[str],
                     error: type[Exception], where: str | Path | None = None) -> T:
    """`schema` (a dataclass) filled from `layers` (mappings, lowest first) and `key.path=value`
    overrides; unknown keys and wrong types are `error`, naming the key and `where`."""
    for item in overrides:
        if "=" not in item:
            raise error(f"override {item!r} is not of the form key.path=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers,
                                 OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise error(one_line(err, where)) from None


def one_line(err: OmegaConfBaseException, where: str | Path | None) -> str:
    """OmegaConf's messages are multi-line with a `full_key`; keep the key and the reason."""
    key = getattr(err, "full_key", None)
    reason = str(err).splitlines()[0].strip()
    suffix = f" in {where}" if where else ""
    return f"{key}: {reason}{suffix}" if key else f"{reason}{suffix}"
