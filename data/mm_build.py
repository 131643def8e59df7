"""`mmfm data shards --multimodal RECIPE.yaml`: real media (and text) -> interleaved shard sets.

A recipe (see configs/data/mm_demo.yaml) names shard *sets*; each set gathers documents
from media sources (mmfm.data.mm_media) and/or a text JSONL, and is written as
``OUT/<set>/train`` and ``OUT/<set>/val`` (WebDataset shards + index.json, see
mmfm.data.mm_shards). A training config lists the sets as `multimodal.sources` with
mixture weights. ``OUT/manifest.json`` records each source's origin, license and counts
and every source that could not be had.

Documents: media items of one group (a stamp category, a prompt folder) are taken
`items_per_doc` at a time (a seeded random count in [min, max]) and interleaved as
``[media, caption-or-transcript, media, caption, ...]``; a stamp with a spoken description
becomes ``[image, audio, caption]`` in a set with `spoken_captions` (which keeps only
those). Text-only documents come
from a JSONL file's "text" field. About `val_fraction` of each set's documents (at least
one) are held out, chosen by a stable hash of the document key.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfm.data.corpus import holdout_score
from mmfm.data.mm_media import MEDIA_SOURCES, MediaCollection, MediaItem, collect_media
from mmfm.data.mm_shards import write_mm_shards
from mmfm.errors import UserValueError


@dataclass(kw_only=True)
class ShardSetRecipe:
    """One shard set: which sources feed it and how documents are composed."""

    media: list[str] = field(default_factory=list)  # names from MEDIA_SOURCES
    jsonl: str | None = None  # text-only documents from this JSONL file ("text" field)
    items_per_doc: list[int] = field(default_factory=lambda: [1, 3])  # [min, max]
    # Only media with a spoken description (tuxpaint stamps), as [image, audio, caption].
    spoken_captions: bool = False
    max_items: int | None = None  # cap on media items per source
    max_docs: int | None = None  # cap on text documents


@dataclass(kw_only=True)
class MMRecipe:
    out: str
    cache: str = "~/.cache/mmfm/media"
    seed: int = 0
    val_fraction: float = 0.05
    shard_name: str = "mm"
    max_samples_per_shard: int = 64
    max_bytes_per_shard: int | None = None
    sets: dict[str, ShardSetRecipe] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.sets:
            raise UserValueError("recipe.sets is empty: name at least one shard set")
        if not 0 <= self.val_fraction < 1:
            raise UserValueError(f"recipe.val_fraction={self.val_fraction} must be in [0, 1)")
        for name, s in self.sets.items():
            unknown = sorted(set(s.media) - set(MEDIA_SOURCES))
            if unknown:
                raise UserValueError(f"recipe.sets.{name}.media: unknown sources {unknown}; known: "
                                 f"{', '.join(MEDIA_SOURCES)}")
            if not s.media and not s.jsonl:
                raise UserValueError(f"recipe.sets.{name} has neither media nor jsonl")
            lo, hi = (list(s.items_per_doc) + [0, 0])[:2]
            if not 1 <= lo <= hi:
                raise UserValueError(f"recipe.sets.{name}.items_per_doc={list(s.items_per_doc)} "
                                 "must be [min, max] with 1 <= min <= max")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> MMRecipe:
    """Parse and validate a recipe YAML (OmegaConf structured: unknown keys are errors)."""
    from mmfm.yaml_config import merge_structured, read_yaml_mapping

    raw = read_yaml_mapping(path, UserValueError, what="recipe file")
    recipe = merge_structured(MMRecipe, [raw], overrides, UserValueError, f"recipe {path}")
    recipe.validate()
    return recipe


def build_mm_shards(recipe: MMRecipe, log=print) -> dict[str, Any]:
    """Collect the media, compose documents, write every set's train/val shards; return the
    manifest (also written to OUT/manifest.json)."""
    started = time.monotonic()
    out = Path(recipe.out)
    cache = Path(recipe.cache).expanduser()
    sources = sorted({m for s in recipe.sets.values() for m in s.media})
    media = collect_media(sources, cache)
    for note in media.notes:
        log(f"  media source {note['source']} unavailable, continuing without it: {note['reason']}")
    manifest: dict[str, Any] = {"sets": {}, "skipped_sources": media.notes,
                                "media_sources": _source_entries(media)}
    for name, set_recipe in recipe.sets.items():
        docs = list(_set_documents(name, set_recipe, media, recipe.seed))
        if not docs:
            log(f"  set {name}: no documents (all its sources are unavailable), skipped")
            manifest["sets"][name] = {"skipped": "no documents"}
            continue
        manifest["sets"][name] = _write_set(out / name, name, docs, recipe)
        counts = manifest["sets"][name]
        log(f"  set {name}: {counts['train']['num_samples']} train / "
            f"{counts['val']['num_samples']} val documents -> {out / name}")
    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _source_entries(media: MediaCollection) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for item in media.items:
        e = entries.setdefault(item.source, {"items": 0, "spoken": 0, "license": item.license})
        e["items"] += 1
        e["spoken"] += item.speech is not None
    return entries


def _write_set(out: Path, name: str, docs: list[dict[str, Any]], recipe: MMRecipe) -> dict:
    val = [d for d in docs if holdout_score(d["key"], recipe.seed) < recipe.val_fraction]
    if not val and recipe.val_fraction > 0 and len(docs) > 1:
        val = [min(docs, key=lambda d: holdout_score(d["key"], recipe.seed))]
    val_keys = {d["key"] for d in val}
    train = [d for d in docs if d["key"] not in val_keys]
    kw = {"name": recipe.shard_name, "max_samples": recipe.max_samples_per_shard,
          "max_bytes": recipe.max_bytes_per_shard}
    result = {"train": _summary(write_mm_shards(train, out / "train", **kw))}
    result["val"] = _summary(write_mm_shards(val, out / "val", **kw)) if val else {"num_samples": 0}
    return result


def _summary(index: dict[str, Any]) -> dict[str, Any]:
    return {"num_samples": index["num_samples"], "shards": len(index["shards"]),
            "sources": index["sources"]}


def _set_documents(name: str, s: ShardSetRecipe, media: MediaCollection,
                   seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(f"{seed}/{name}")
    for source in s.media:
        items = [i for i in media.items if i.source == source and (
            i.speech is not None or not s.spoken_captions)]
        if s.max_items is not None and len(items) > s.max_items:  # spread over all groups
            keep = set(rng.sample(range(len(items)), s.max_items))
            items = [item for i, item in enumerate(items) if i in keep]
        yield from _media_documents(name, source, items, s, rng)
    if s.jsonl:
        yield from _text_documents(name, Path(s.jsonl), s.max_docs)


def _media_documents(set_name: str, source: str, items: list[MediaItem], s: ShardSetRecipe,
                     rng: random.Random) -> Iterator[dict[str, Any]]:
    groups: dict[str, list[MediaItem]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    lo, hi = s.items_per_doc[0], s.items_per_doc[1]
    number = 0
    for group in sorted(groups):
        members = groups[group]
        i = 0
        while i < len(members):
            take = members[i:i + rng.randint(lo, hi)]
            i += len(take)
            yield {"key": f"{set_name}{source}{number:06d}", "segments": _segments(take, s),
                   "source": source, "license": take[0].license, "language": "en",
                   "origin": [m.name for m in take]}
            number += 1


def _segments(items: list[MediaItem], s: ShardSetRecipe) -> list[dict[str, Any]]:
    segments: list[dict[str, Any]] = []
    for item in items:
        segments.append({item.kind: item.data, "format": item.fmt})
        if s.spoken_captions and item.speech is not None:
            segments.append({"audio": item.speech.data, "format": item.speech.fmt})
        segments.append({"text": item.text})
    return segments


def _text_documents(set_name: str, path: Path, max_docs: int | None) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise UserValueError(f"text JSONL {path} does not exist (build it with `mmfm data corpus`)")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f):
            if max_docs is not None and number >= max_docs:
                return
            doc = json.loads(line)
            if doc.get("text"):
                yield {"key": f"{set_name}text{number:07d}", "segments": [{"text": doc["text"]}],
                       "source": str(doc.get("source", path.stem)),
                       "license": str(doc.get("license", "see corpus manifest")),
                       "language": "en"}


def cmd_mm_shards(recipe_path: str | Path, out: str | Path | None = None) -> int:
    """`mmfm data shards --multimodal RECIPE.yaml [--out DIR]`: build and print a summary."""
    recipe = load_recipe(recipe_path, [f"out={out}"] if out is not None else [])
    manifest = build_mm_shards(recipe)
    for name, entry in manifest["media_sources"].items():
        print(f"  media {name:<11} {entry['items']:>5} items ({entry['spoken']} spoken)  "
              f"[{entry['license'][:40]}]")
    print(f"multimodal shard sets written to {recipe.out} in {manifest['build_seconds']:.1f}s "
          f"(manifest: {Path(recipe.out) / 'manifest.json'})")
    return 0
