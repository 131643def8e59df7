"""Dotted overrides anywhere on the command line, before or after flags.

argparse takes a positional list (`overrides`, nargs="*") only in one run: in
`mmfm train CFG --resume train.steps=60` the list is closed by `--resume`, and
`train.steps=60` used to end in "unrecognized arguments". `parse_args_anywhere` parses with
`parse_known_args` and moves every left-over `key.path=value` into `args.overrides`, in the
order given (later ones win, as in OmegaConf); anything else left over is still an error.
Wire it in `mmfm.cli.main`: `args = parse_args_anywhere(build_parser(), argv)`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

# `a.b.c=value`, `multimodal.sources.images.weight=2`, `list.0=x`; never a flag (`--x=1`).
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def is_override(arg: str) -> bool:
    """Whether a command-line word is a dotted `key.path=value` override."""
    return OVERRIDE.match(arg) is not None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(overrides, the other words), each in its original order."""
    overrides = [a for a in argv if is_override(a)]
    return overrides, [a for a in argv if not is_override(a)]


def parse_args_anywhere(parser: argparse.ArgumentParser,
                        argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that overrides may also follow flags (commands whose
    parser has an `overrides` positional; for the others a stray override stays an error)."""
    args, extras = parser.parse_known_args(argv)
    late, unknown = split_overrides(extras)
    if late and not hasattr(args, "overrides"):
        unknown = extras
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args
