"""Curation recipes: a typed YAML file naming sources, filter chains, dedup, mixture,
tokenizer and executor settings.

OmegaConf structured configs parse the YAML and check types and unknown keys; this module
adds the cross-field rules (a source names an existing chain, shares sum to 1, a chain names
a known stage with known parameters, a source path exists). Every failure is one
:class:`RecipeError` line naming the file and the field path, e.g.::

    configs/data/demo.yaml: chains.prose[3]: unknown stage 'gopher_qualty'; known: c4, ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmfm.errors import UserValueError

KINDS = ("web", "books", "code", "academic", "encyclopedic", "docs", "boilerplate", "other")
FORMATS = ("text", "jsonl", "parquet", "code", "html", "builtin")
BUILTINS = ("wikipedia", "shakespeare", "python_stdlib", "common_licenses", "debian_copyright",
            "debian_html_docs")
EXECUTORS = ("local", "slurm", "ray")
KEEP_RULES = ("priority",)


class RecipeError(UserValueError):
    """A user error in a recipe; the message is one line naming the file and field."""


@dataclass(kw_only=True)
class SourceSpec:
    """One input source. Either `builtin` (a default-corpus source) or `path` + `format`."""

    name: str
    kind: str = "other"
    license: str = "unknown"
    path: Optional[str] = None
    format: str = "text"
    builtin: Optional[str] = None
    extensions: Optional[list[str]] = None  # file suffixes to read (default per format)
    text_field: str = "text"  # JSONL / Parquet column holding the text
    id_field: Optional[str] = "id"
    chain: Optional[str] = None  # filter chain name; default "code" for kind code, else "prose"
    languages: Optional[list[str]] = None  # ISO 639-1 codes kept by the language stage
    lang_threshold: float = 0.5
    target_share: Optional[float] = None  # share of the mixture's tokens (all or none set)
    max_docs: Optional[int] = None
    max_bytes: Optional[int] = None  # builtin sources: total byte budget (sampled by hash)
    optional: bool = False  # a missing path is a note in the report instead of an error


@dataclass(kw_only=True)
class DedupSpec:
    exact: bool = True
    near: bool = True
    ngram: int = 5  # word n-gram shingles
    bands: int = 14
    rows: int = 8  # bands x rows = number of MinHash permutations (FineWeb: 14 x 8 = 112)
    seed: int = 1
    keep: str = "priority"
    priority: Optional[list[str]] = None  # source names, most preferred first (default: order)
    # Scale-out (same clusters, see dedup_sharded.py): exact dedup as `exact_partitions`
    # tasks by hash, near dedup as bands x `hash_ranges` bucket tasks on the executor.
    sharded: bool = False
    exact_partitions: int = 4
    hash_ranges: int = 1


@dataclass(kw_only=True)
class MixtureSpec:
    total_tokens: Optional[int] = None  # default: the curated total (shares move tokens)
    max_epochs: float = 4.0  # cap on up-sampling of any one source
    holdout_fraction: float = 0.02


@dataclass(kw_only=True)
class TokenizerSpec:
    path: Optional[str] = None  # use this tokenizer.json instead of training one
    vocab_size: int = 8192
    sample_chars: int = 8_000_000  # characters of the mixture sampled for training


@dataclass(kw_only=True)
class ExecutorSpec:
    kind: str = "local"
    workers: int = 1  # processes running tasks at once (local)
    tasks: int = 0  # 0: 2 x workers (local), the sharding of every source
    slurm: dict[str, Any] = field(default_factory=dict)  # SlurmPipelineExecutor kwargs
    ray: dict[str, Any] = field(default_factory=dict)  # RayPipelineExecutor kwargs


@dataclass(kw_only=True)
class ReportSpec:
    examples_per_filter: int = 3
    example_chars: int = 300
    html: bool = True


@dataclass(kw_only=True)
class Recipe:
    name: str
    output: str
    sources: list[SourceSpec]
    chains: dict[str, list[Any]]
    work_dir: Optional[str] = None  # default: OUTPUT/.work (restart state)
    strict: bool = False  # bad input raises naming file and line instead of being counted
    seed: int = 0
    dedup: DedupSpec = field(default_factory=DedupSpec)
    mixture: MixtureSpec = field(default_factory=MixtureSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    base_dir: str = "."  # relative source paths resolve against this (the recipe's folder)

    def chain_for(self, src: SourceSpec) -> str:
        return src.chain or ("code" if src.kind == "code" else "prose")

    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output) / ".work"

    def num_tasks(self) -> int:
        return self.executor.tasks or max(1, 2 * self.executor.workers)

    def source_path(self, src: SourceSpec) -> Path | None:
        if src.path is None:
            return None
        p = Path(src.path).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, keys: tuple[str, ...] | None = None) -> str:
        """sha256 of the settings that decide the output (of `keys` only when given)."""
        d = self.to_dict()
        for k in ("output", "work_dir", "executor", "report", "base_dir"):
            d.pop(k)
        for k in ("sharded", "exact_partitions", "hash_ranges"):  # same output either way
            d["dedup"].pop(k)
        if keys is not None:
            d = {k: d[k] for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                check_paths: bool = True) -> Recipe:
    """Parse and validate a recipe file; raises RecipeError (one line) on any problem.
    `check_paths=False` skips the existence check of source paths (for recipes written
    for another machine, e.g. a cluster's)."""
    from mmfm.yaml_config import read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path, RecipeError, what="recipe file")
    raw.setdefault("base_dir", str(path.parent.resolve()))
    return recipe_from_dict(raw, where=str(path), overrides=overrides, check_paths=check_paths)


def recipe_from_dict(raw: dict[str, Any], where: str = "<recipe>",
                     overrides: list[str] | None = None, check_paths: bool = True) -> Recipe:
    sources = raw.get("sources")
    for i, src in enumerate(sources if isinstance(sources, list) else []):
        _check_node(SourceSpec, src, f"sources[{i}]", where)  # errors with the list index
    from mmfm.yaml_config import merge_structured

    recipe = merge_structured(Recipe, [raw], overrides or (), RecipeError, where)
    validate_recipe(recipe, where, check_paths)
    return recipe


def _check_node(cls: type, node: Any, prefix: str, where: str) -> None:
    try:
        OmegaConf.merge(OmegaConf.structured(cls), node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise RecipeError(f"{where}: {prefix}{'.' + key if key else ''}: "
                          f"{str(e).splitlines()[0]}") from e


def _fail(where: str, field_path: str, why: str) -> None:
    raise RecipeError(f"{where}: {field_path}: {why}")


def validate_recipe(r: Recipe, where: str, check_paths: bool = True) -> None:
    if not r.sources:
        _fail(where, "sources", "at least one source is needed")
    names = [s.name for s in r.sources]
    for i, s in enumerate(r.sources):
        _validate_source(r, s, f"sources[{i}]", where, check_paths)
        if s.name in names[:i]:
            _fail(where, f"sources[{i}].name", f"duplicate source name {s.name!r}")
    _validate_shares(r, where)
    from mmfm.data.curation.filters import validate_chain

    for name, chain in r.chains.items():
        validate_chain(chain, f"chains.{name}", lambda p, why: _fail(where, p, why))
    _validate_dedup(r, names, where)
    _validate_numbers(r, where)


def _validate_source(r: Recipe, s: SourceSpec, p: str, where: str, check_paths: bool) -> None:
    if s.kind not in KINDS:
        _fail(where, f"{p}.kind", f"unknown kind {s.kind!r}; expected one of {', '.join(KINDS)}")
    if s.builtin is not None:
        if s.builtin not in BUILTINS:
            _fail(where, f"{p}.builtin", f"unknown builtin source {s.builtin!r}; expected one "
                  f"of {', '.join(BUILTINS)}")
    else:
        if s.format not in FORMATS or s.format == "builtin":
            _fail(where, f"{p}.format", f"unknown format {s.format!r}; expected one of "
                  f"{', '.join(f for f in FORMATS if f != 'builtin')}")
        if s.path is None:
            _fail(where, f"{p}.path", "a source needs `path` (or `builtin`)")
        sp = r.source_path(s)
        if check_paths and not s.optional and sp is not None and not sp.exists():
            _fail(where, f"{p}.path", f"does not exist: {sp}")
    chain = r.chain_for(s)
    if chain not in r.chains:
        _fail(where, f"{p}.chain", f"no chain named {chain!r} in `chains` "
              f"(have: {', '.join(sorted(r.chains)) or 'none'})")
    if not 0.0 <= s.lang_threshold <= 1.0:
        _fail(where, f"{p}.lang_threshold", f"{s.lang_threshold} must be in [0, 1]")
    if s.target_share is not None and not 0.0 < s.target_share <= 1.0:
        _fail(where, f"{p}.target_share", f"{s.target_share} must be in (0, 1]")


def _validate_shares(r: Recipe, where: str) -> None:
    shares = [s.target_share for s in r.sources]
    given = [x for x in shares if x is not None]
    if given and len(given) != len(shares):
        missing = [s.name for s in r.sources if s.target_share is None]
        _fail(where, "sources", f"target_share is set for some sources but not for {missing}")
    if given and abs(sum(given) - 1.0) > 1e-6:
        _fail(where, "sources", f"target_share values sum to {sum(given):.4f}, not 1")


def _validate_dedup(r: Recipe, names: list[str], where: str) -> None:
    d = r.dedup
    if d.keep not in KEEP_RULES:
        _fail(where, "dedup.keep", f"unknown keep rule {d.keep!r}; expected one of {KEEP_RULES}")
    for k in ("ngram", "bands", "rows", "exact_partitions", "hash_ranges"):
        if getattr(d, k) <= 0:
            _fail(where, f"dedup.{k}", f"{getattr(d, k)} must be > 0")
    for i, n in enumerate(d.priority or []):
        if n not in names:
            _fail(where, f"dedup.priority[{i}]", f"{n!r} is not a source name")


def _validate_numbers(r: Recipe, where: str) -> None:
    if r.executor.kind not in EXECUTORS:
        _fail(where, "executor.kind", f"unknown executor {r.executor.kind!r}; expected one of "
              f"{', '.join(EXECUTORS)}")
    if r.executor.workers <= 0:
        _fail(where, "executor.workers", f"{r.executor.workers} must be > 0")
    if r.executor.tasks < 0:
        _fail(where, "executor.tasks", f"{r.executor.tasks} must be >= 0")
    if not 0 <= r.mixture.holdout_fraction < 1:
        _fail(where, "mixture.holdout_fraction", f"{r.mixture.holdout_fraction} must be in [0, 1)")
    if r.mixture.max_epochs < 1:
        _fail(where, "mixture.max_epochs", f"{r.mixture.max_epochs} must be >= 1")
    if r.tokenizer.vocab_size < 264:
        _fail(where, "tokenizer.vocab_size", f"{r.tokenizer.vocab_size} must be >= 264")
