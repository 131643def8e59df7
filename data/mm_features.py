"""Frozen-encoder feature caches beside multimodal shards (`mmfm data encode`).

Shape legend: N items, P output tokens of one item, E encoder width.

With a frozen tower, encoding every image every epoch repeats the same work; `mmfm data
encode` runs each frozen encoder once over a shard set and stores every item's valid output
tokens (P, E), before the projector (which trains). Layout, per shard set and modality::

    SHARDS/features/<modality>/index.json        fingerprint, encoder config, shards
    SHARDS/features/<modality>/mm-000000.safetensors   "<key>.<member>" -> (P, E) float32

`index.json` is written last, so a half-written cache has none and is not used. The loader
uses a cache when every shard set of the run has one for the modality, its fingerprint
(weights + preprocessing, :func:`mmfm.encoders.features.encoder_fingerprint`) equals the
run's encoder's, and its shard list (names and sizes) equals the shard set's; anything else
is refused with a one-line :class:`FeatureCacheError`. Items that could not be decoded when
the cache was written are absent and are skipped as `corrupt_<modality>` like undecodable
media, so a cached run sees the same documents as an uncached one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfm.data.mm_shards import (
    MemberRef,
    SampleError,
    ShardError,
    decode_document,
    iter_raw_samples,
    read_mm_index,
)
from mmfm.data.shards import _write_json_atomic
from mmfm.encoders.features import FeatureCacheError, preprocessing_key
from mmfm.encoders.media import MediaError, decode_audio, decode_image
from mmfm.encoders.registry import build_preprocessor
from mmfm.errors import UserValueError

FEATURES_FORMAT = "mmfm-mm-features"
FEATURES_VERSION = 1
INDEX_NAME = "index.json"

__all__ = ["FeatureCacheError", "FeatureStore", "cache_dir", "check_caches", "encode_shard_set",
           "fill_features", "read_cache_index"]


def cache_dir(shard_dir: str | Path, modality: str) -> Path:
    return Path(shard_dir) / "features" / modality


def read_cache_index(shard_dir: str | Path, modality: str) -> dict[str, Any] | None:
    """The cache index of one shard set and modality, or None when there is no cache."""
    import json

    path = cache_dir(shard_dir, modality) / INDEX_NAME
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != FEATURES_FORMAT or index.get("version") != FEATURES_VERSION:
        raise FeatureCacheError(f"{path} is not an mmfm feature cache index (version "
                                f"{FEATURES_VERSION}); re-run `mmfm data encode`")
    return index


# ----------------------------------------------------------------------------- writing

def encode_shard_set(shard_dir: str | Path, modality: str, encoder: nn.Module, cfg: Any,
                     fingerprint: str, batch_size: int = 32) -> dict[str, Any]:
    """Run `encoder` (eval, no grad) over every `modality` item of the shard set and write
    its cache; returns the cache index (with `items` and `skipped` counts)."""
    shard_index = read_mm_index(shard_dir)
    out = cache_dir(shard_dir, modality)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # the old cache is invalid from here on
    pre = build_preprocessor(cfg)
    encoder.eval()
    shards, out_dim, skipped = [], None, 0
    for entry in shard_index["shards"]:
        items, bad = _shard_items(Path(shard_dir) / entry["name"], modality, pre)
        feats = _encode_items(items, encoder, pre, batch_size)
        out_dim = encoder.out_dim
        name = Path(entry["name"]).stem + ".safetensors"
        _save_atomic(feats, out / name)
        shards.append({"name": entry["name"], "bytes": entry["bytes"], "features": name,
                       "items": len(feats)})
        skipped += bad
    index = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, "modality": modality,
             "fingerprint": fingerprint, "encoder": preprocessing_key(cfg), "out_dim": out_dim,
             "dtype": "float32", "shards": shards,
             "items": sum(s["items"] for s in shards), "skipped": skipped}
    _write_json_atomic(out / INDEX_NAME, index)
    return index


def _shard_items(path: Path, modality: str, pre: Any) -> tuple[list[tuple[str, Tensor]], int]:
    """([("<key>.<member>", preprocessed item)], items or samples that failed to decode)."""
    items, bad = [], 0
    try:
        for raw in iter_raw_samples(path):
            try:
                segments, _ = decode_document(raw, undecoded=frozenset({modality}))
            except SampleError:
                bad += 1
                continue
            for kind, ref in segments:
                if kind != modality:
                    continue
                try:
                    items.append((f"{ref.key}.{ref.member}",
                                  pre.preprocess(_decode(kind, raw.members[ref.member]))))
                except MediaError:
                    bad += 1
    except ShardError:
        bad += 1  # the rest of a broken shard is skipped, as the lenient loader does
    return items, bad


def _decode(kind: str, data: bytes) -> Any:
    return decode_image(data) if kind == "image" else decode_audio(data)


@torch.no_grad()
def _encode_items(items: list[tuple[str, Tensor]], encoder: nn.Module, pre: Any,
                  batch_size: int) -> dict[str, Tensor]:
    feats: dict[str, Tensor] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        data, lengths_N = pre.collate([x for _, x in chunk])
        out_NPE = encoder(data, lengths_N).float()
        out_N = encoder.output_lengths(lengths_N)
        for (name, _), out_PE, n in zip(chunk, out_NPE, out_N.tolist(), strict=True):
            feats[name] = out_PE[:n].contiguous().clone()
    return feats


def _save_atomic(feats: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(feats, str(tmp))
    os.replace(tmp, path)


def encode_config(cfg: Any, batch_size: int = 32) -> list[dict[str, Any]]:
    """Build the run's model as the trainer does (seed, then `train.init_from`) and cache
    every frozen encoder's outputs for every shard set (train and val) of the config; one
    summary row per (modality, shard set)."""
    from mmfm.train.multimodal import MultimodalTask

    if cfg.multimodal is None or cfg.data.kind != "multimodal":
        raise UserValueError("mmfm data encode needs a multimodal config (data.kind=multimodal)")
    if batch_size <= 0:
        raise UserValueError(f"--batch-size={batch_size} must be > 0")
    frozen = [m for m, c in cfg.multimodal.encoders().items() if c.train_mode == "frozen"]
    if not frozen:
        raise UserValueError("no frozen encoder to cache: set multimodal.<image|audio>.train_mode="
                             "frozen (trainable encoders must run every step)")
    task = MultimodalTask(cfg)
    torch.manual_seed(cfg.run.seed)  # the trainer's seeding, so random towers match too
    model = task.build_model()
    if cfg.train.init_from:
        from mmfm.train.checkpoint import load_weights

        load_weights(model, Path(cfg.train.init_from))
    rows = []
    for modality in frozen:
        slot = model.slots[modality]
        for directory in _shard_dirs(cfg.multimodal):
            index = encode_shard_set(directory, modality, slot.encoder, slot.encoder_cfg,
                                     slot.fingerprint(), batch_size)
            rows.append({"modality": modality, "dir": str(directory), "items": index["items"],
                         "skipped": index["skipped"], "fingerprint": index["fingerprint"]})
    return rows


def _shard_dirs(mm: Any) -> list[Path]:
    dirs = [Path(d) for s in mm.sources.values() for d in (s.train, s.val) if d]
    return list(dict.fromkeys(dirs))


# ----------------------------------------------------------------------------- reading

def check_caches(shard_dirs: list[str | Path], modality: str, fingerprint: str) -> dict | None:
    """The index of the first cache when every shard set in `shard_dirs` has a valid
    `modality` cache for `fingerprint`; None when none has one; FeatureCacheError (naming the
    cache) when some have one and another is missing, stale, or made for other shards."""
    indices = {Path(d): read_cache_index(d, modality) for d in shard_dirs}
    if all(index is None for index in indices.values()):
        return None
    for d, index in indices.items():
        where = cache_dir(d, modality)
        if index is None:
            raise FeatureCacheError(f"{where} has no {modality} feature cache but other shard sets "
                                    "of this run have one: run `mmfm data encode` with this config")
        if index["fingerprint"] != fingerprint:
            raise FeatureCacheError(
                f"{where}: stale {modality} feature cache, made by encoder "
                f"{index['fingerprint'][:12]} but this run's encoder is {fingerprint[:12]} "
                "(other weights or preprocessing); re-run `mmfm data encode` or delete it")
        shards = [(s["name"], s["bytes"]) for s in read_mm_index(d)["shards"]]
        if [(s["name"], s["bytes"]) for s in index["shards"]] != shards:
            raise FeatureCacheError(f"{where}: the {modality} feature cache was made for other "
                                    "shards than the ones there now; re-run `mmfm data encode`")
    return next(index for index in indices.values() if index is not None)


class FeatureStore:
    """One shard set's cached features of one modality; shard files open lazily (mmap)."""

    MAX_OPEN = 4

    def __init__(self, shard_dir: str | Path, modality: str) -> None:
        self.dir, self.modality = cache_dir(shard_dir, modality), modality
        self._open: dict[str, Any] = {}

    def get(self, shard_name: str, ref: MemberRef) -> Tensor:
        """The (P, E) features of one item; SampleError when the cache lacks it (its media
        could not be decoded when the cache was written)."""
        handle = self._handle(shard_name)
        name = f"{ref.key}.{ref.member}"
        if name not in handle.keys():
            raise SampleError(f"corrupt_{self.modality}", f"{name} is not in the feature cache "
                              f"{self.dir} (it could not be decoded when the cache was written)")
        return handle.get_tensor(name)

    def _handle(self, shard_name: str) -> Any:
        from safetensors import safe_open

        if shard_name not in self._open:
            if len(self._open) >= self.MAX_OPEN:
                self._open.pop(next(iter(self._open)))
            path = self.dir / (Path(shard_name).stem + ".safetensors")
            self._open[shard_name] = safe_open(str(path), framework="pt")
        return self._open[shard_name]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # handles do not cross into worker processes


def fill_features(segments: list[tuple[str, Any]], stores: dict[str, FeatureStore],
                  shard_name: str) -> list[tuple[str, Any]]:
    """`segments` with every undecoded media reference replaced by its cached features."""
    return [(kind, stores[kind].get(shard_name, value) if isinstance(value, MemberRef) else value)
            for kind, value in segments]

