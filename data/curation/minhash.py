"""Exact and near (MinHash-LSH) deduplication.

Near dedup follows FineWeb's setting: word 5-gram shingles, 112 MinHash values in
14 bands x 8 rows, so two documents become candidates with probability
``1 - (1 - J**8)**14`` (0.5 at Jaccard J ~ 0.72, > 0.99 at 0.85, ~1e-5 at 0.17).
Candidates are joined by union-find into clusters and one document per cluster is kept.

Signatures use datasketch's ``affine32`` permutation scheme (MurmurHash3 finalizer, then
``a*h + b mod 2**32``) over 32-bit shingle ids (:func:`shingle_ids`), vectorized over a
whole document in numpy. Because the scheme and seeds are the same, our signatures are
bit-identical to ``datasketch.MinHash(num_perm, seed, scheme="affine32")`` fed the same
shingle ids, and the candidate pairs equal ``datasketch.MinHashLSH(params=(bands, rows))``'s;
tests check both.
Why not datatrove's MinHash stages: they are four file-based pipeline runs whose cluster
step keeps a positional document, while we need a stated keep rule across sources and the
cluster sizes for the report; signatures here are still computed inside the parallel
per-shard tasks, and only banding + union-find (cheap) run in one process.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

from mmfm.errors import UserValueError

_WORD = re.compile(r"\w+")
_FMIX = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35),
         np.uint32(16))
MAX_HASH = np.uint32(0xFFFFFFFF)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (Unicode ``\\w+``): punctuation and spacing do not count."""
    return _WORD.findall(text.lower())


def shingles(text: str, n: int = 5) -> list[str]:
    """Word n-grams joined by spaces; a document shorter than n words is one shingle."""
    w = words(text)
    if len(w) < n:
        return [" ".join(w)] if w else []
    return [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]


def shingle_hash(s: str) -> int:
    return xxhash.xxh32_intdigest(s.encode("utf-8"))


_ROLL = np.uint32(0x01000193)  # FNV prime: the polynomial base combining word hashes


def shingle_ids(text: str, n: int = 5) -> np.ndarray:
    """The document's distinct word n-grams as 32-bit ids (sorted, unique).

    Each word is hashed once (xxh32) and an n-gram's id is the polynomial
    ``sum_k h(w_{i+k}) * P**(n-1-k) mod 2**32``, computed for all positions at once in numpy;
    this avoids building and hashing every n-gram string (the slow part of plain MinHash)."""
    w = words(text)
    if not w:
        return np.empty(0, dtype=np.uint32)
    h = np.fromiter((xxhash.xxh32_intdigest(x) for x in w), dtype=np.uint32, count=len(w))
    m = len(w) - n + 1
    if m <= 0:
        ids = np.zeros(1, dtype=np.uint32)
        for x in h:
            ids = ids * _ROLL + x
        return ids
    ids = h[:m].copy()
    for k in range(1, n):
        ids = ids * _ROLL + h[k:k + m]
    return np.unique(ids)


def exact_hash(text: str) -> str:
    """Hash of the text with case and whitespace normalized (same words, same hash)."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' word n-gram sets."""
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class MinHasher:
    """Vectorized MinHash signatures: ``signature(text) -> uint32[num_perm]``."""

    def __init__(self, num_perm: int = 112, seed: int = 1, ngram: int = 5):
        gen = np.random.RandomState(seed)
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        self.a, self.b = a.reshape(1, -1), b.reshape(1, -1)
        self.num_perm, self.seed, self.ngram = num_perm, seed, ngram

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_hashes(shingle_ids(text, self.ngram))

    def signature_of_hashes(self, hv: np.ndarray) -> np.ndarray:
        if hv.size == 0:
            return np.full(self.num_perm, MAX_HASH, dtype=np.uint32)
        s1, m1, s2, m2, s3 = _FMIX
        h = hv.astype(np.uint32).reshape(-1, 1)
        h = h ^ (h >> s1)
        h = h * m1
        h = h ^ (h >> s2)
        h = h * m2
        h = h ^ (h >> s3)
        out = np.full(self.num_perm, MAX_HASH, dtype=np.uint32)
        for start in range(0, h.shape[0], 4096):  # bounded memory on book-length texts
            block = h[start:start + 4096] * self.a + self.b
            np.minimum(out, block.min(axis=0), out=out)
        return out


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True

    def clusters(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for i in range(len(self.parent)):
            out[self.find(i)].append(i)
        return dict(out)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``[n, bands]`` bucket keys: a 64-bit hash of each band's `rows` values."""
    n = sigs.shape[0]
    if sigs.shape[1] < bands * rows:
        raise UserValueError(f"signatures have {sigs.shape[1]} values, bands x rows needs "
                         f"{bands * rows}")
    view = np.ascontiguousarray(sigs[:, : bands * rows]).reshape(n, bands, rows)
    keys = np.empty((n, bands), dtype=np.uint64)
    for j in range(bands):
        block = np.ascontiguousarray(view[:, j, :])
        raw = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        keys[:, j] = [xxhash.xxh3_64_intdigest(r.tobytes()) for r in raw]
    return keys


def lsh_candidate_pairs(sigs: np.ndarray, bands: int = 14, rows: int = 8) -> set[tuple[int, int]]:
    """Every pair (i < j) that shares at least one band bucket. Quadratic in bucket size:
    for tests and benchmarks; :func:`lsh_clusters` is what the pipeline uses."""
    pairs: set[tuple[int, int]] = set()
    for bucket in _buckets(sigs, bands, rows):
        for x in range(len(bucket)):
            for y in range(x + 1, len(bucket)):
                pairs.add((bucket[x], bucket[y]))
    return pairs


def _buckets(sigs: np.ndarray, bands: int, rows: int) -> Iterable[list[int]]:
    keys = band_keys(sigs, bands, rows)
    for j in range(bands):
        groups: dict[int, list[int]] = defaultdict(list)
        for i, k in enumerate(keys[:, j].tolist()):
            groups[k].append(i)
        yield from (g for g in groups.values() if len(g) > 1)


def lsh_clusters(sigs: np.ndarray, bands: int = 14, rows: int = 8) -> UnionFind:
    """Union-find over documents that share a band bucket (linear in the bucket sizes:
    each member is joined to the bucket's first document)."""
    uf = UnionFind(sigs.shape[0])
    for bucket in _buckets(sigs, bands, rows):
        first = bucket[0]
        for other in bucket[1:]:
            uf.union(first, other)
    return uf


def choose_keeper(members: Sequence[int], priority: Sequence[int], n_words: Sequence[int],
                  ids: Sequence[str]) -> int:
    """The keep rule: the document of the most preferred source (lowest priority rank),
    then the one with the most words, then the smallest id; deterministic whatever the
    order documents arrived in."""
    return min(members, key=lambda i: (priority[i], -n_words[i], ids[i]))
