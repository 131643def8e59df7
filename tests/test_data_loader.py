"""Training/validation loaders: packing, document ids, rank/worker split, exact resume."""

from __future__ import annotations

import json
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfm.data.loader import (
    IGNORE_INDEX,
    Batch,
    TokenLoader,
    _doc_order,
    iter_eval_batches,
    reader_shards,
)
from mmfm.data.readers import read_code_tree
from mmfm.data.shards import iter_shard_docs, write_token_shards
from mmfm.data.tokenizer import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
T, B = 48, 3  # seq_len, micro batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """~50 real documents (stdlib json/ and email/ sources, cut to varied lengths so some
    are shorter and some longer than a row) in 13 shards of 4."""
    root = tmp_path_factory.mktemp("loader")
    docs = list(read_code_tree([STDLIB / "json", STDLIB / "email"], source="stdlib"))
    for i, d in enumerate(docs):
        d["text"] = d["text"][: 40 + (i * 397) % 1500]
    tok = train_tokenizer((d["text"] for d in docs), vocab_size=320)
    index = write_token_shards(docs, tok, root / "train", docs_per_shard=4)
    stored = [[ids for _, ids, _ in iter_shard_docs(root / "train" / s["name"])]
              for s in index["shards"]]
    return {"dir": root / "train", "index": index, "eos": index["eos_id"], "stored": stored}


def _rows(batch: Batch) -> np.ndarray:
    """The (B, T+1) token rows a batch was cut from."""
    return torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1).numpy()


def _split_docs(stream: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(stream == eos)
    assert len(ends) and ends[-1] == len(stream) - 1, "stream must end with a whole document"
    return [tuple(x) for x in np.split(stream, ends[:-1] + 1)]


def _lane_stream(batches: list[Batch], lane: int, n_tokens: int) -> np.ndarray:
    """Row `lane` of every batch, concatenated: one lane's token stream."""
    stream = np.concatenate([_rows(b)[lane] for b in batches])
    assert len(stream) >= n_tokens
    return stream[:n_tokens]


def _lane_docs(shards: dict, lane: int, *split: int, seed: int = 0) -> list[tuple[int, ...]]:
    """The documents lane `lane` of reader `split` reads in epoch 0, in order."""
    docs = []
    for s in reader_shards(len(shards["stored"]), seed, 0, *split):
        stored = shards["stored"][s]
        docs += [tuple(stored[i]) for i in _doc_order(len(stored), seed, 0, s)[lane::B]]
    return docs


def _epoch_docs(shards: dict, batches: list[Batch], *split: int) -> list[tuple[int, ...]]:
    """What every lane of one reader yielded in epoch 0, checked against its plan."""
    seen = []
    for lane in range(B):
        expected = _lane_docs(shards, lane, *split)
        n_tokens = sum(len(d) for d in expected)
        got = _split_docs(_lane_stream(batches, lane, n_tokens), shards["eos"]) if n_tokens else []
        assert got == expected  # in the planned order, each exactly once
        seen += got
    return seen


def test_batch_shapes_and_dtypes(shards):
    batch = next(TokenLoader(shards["dir"], T, B))
    assert batch.input_ids.shape == batch.labels.shape == batch.doc_ids.shape == (B, T)
    assert (batch.input_ids.dtype, batch.labels.dtype, batch.doc_ids.dtype) == (
        torch.int64, torch.int64, torch.int32)
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])
    assert batch.num_target_tokens == B * T  # training rows are never padded


def test_packing_covers_every_document_once_per_epoch(shards):
    loader = TokenLoader(shards["dir"], T, B)
    total = shards["index"]["num_tokens"]
    batches = [next(loader) for _ in range(total // (T + 1) + 2)]
    seen = _epoch_docs(shards, batches, 0, 1, 0, 1)
    expected = [tuple(ids) for shard in shards["stored"] for ids in shard]
    assert Counter(seen) == Counter(expected)


def test_rows_of_a_batch_come_from_different_documents(shards):
    """Lanes: a long document occupies one row of a batch, never the whole batch."""
    loader = TokenLoader(shards["dir"], T, B)
    for _ in range(10):
        rows = _rows(next(loader))
        assert len({tuple(r) for r in rows}) == B
        first_docs = {tuple(r[: np.flatnonzero(r == shards["eos"])[0] + 1])
                      for r in rows if (r == shards["eos"]).any()}
        assert len(first_docs) == sum((r == shards["eos"]).any() for r in rows)


def test_doc_ids_number_documents_within_each_row(shards):
    loader = TokenLoader(shards["dir"], T, B)
    saw_several = False
    for _ in range(20):
        batch = next(loader)
        for row, doc in zip(batch.input_ids.numpy(), batch.doc_ids.numpy(), strict=True):
            ends = (row == shards["eos"]).astype(np.int32)
            expected = np.concatenate([[0], np.cumsum(ends)[:-1]])
            assert doc.tolist() == expected.tolist()
            saw_several |= doc.max() > 0
    assert saw_several
    mask = batch.block_causal_mask()
    assert mask.shape == (B, 1, T, T)
    d = batch.doc_ids[0]
    for q in range(T):
        for k in range(T):
            assert bool(mask[0, 0, q, k]) == (k <= q and bool(d[q] == d[k]))


def test_epochs_reshuffle_shards(shards):
    n = len(shards["stored"])
    orders = [reader_shards(n, 0, e, 0, 1, 0, 1) for e in range(3)]
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert reader_shards(n, 1, 0, 0, 1, 0, 1) != orders[0]  # the seed matters


def test_ranks_and_workers_split_shards_disjointly_and_completely(shards):
    n = len(shards["stored"])
    for epoch in range(3):
        parts = [reader_shards(n, 0, epoch, r, 2, w, 2) for r in range(2) for w in range(2)]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == list(range(n)) and all(parts)


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (2, 2)])
def test_loaders_of_all_ranks_and_workers_cover_the_epoch(shards, world_size, num_workers):
    readers = max(1, num_workers)
    seen: list[tuple[int, ...]] = []
    for rank in range(world_size):
        loader = TokenLoader(shards["dir"], T, B, rank=rank, world_size=world_size,
                             num_workers=num_workers)
        most = max(sum(len(d) for d in _lane_docs(shards, lane, rank, world_size, w, readers))
                   for w in range(readers) for lane in range(B))
        batches = [next(loader) for _ in range(readers * (most // (T + 1) + 2))]
        loader.close()
        for w in range(readers):  # DataLoader returns batches round-robin from workers
            seen += _epoch_docs(shards, batches[w::readers], rank, world_size, w, readers)
    expected = [tuple(ids) for shard in shards["stored"] for ids in shard]
    assert Counter(seen) == Counter(expected)


@pytest.mark.parametrize("num_workers,consumed,more", [(0, 7, 5), (0, None, 6), (2, 7, 6)])
def test_resume_yields_exactly_the_uninterrupted_batches(shards, num_workers, consumed, more):
    if consumed is None:  # resume just after every lane ended its first epoch
        consumed = max(sum(len(d) for d in _lane_docs(shards, lane, 0, 1, 0, 1, seed=3))
                       for lane in range(B)) // (T + 1) + 2
    reference = TokenLoader(shards["dir"], T, B, num_workers=num_workers, seed=3)
    expected = [next(reference) for _ in range(consumed + more)][consumed:]
    reference.close()

    first = TokenLoader(shards["dir"], T, B, num_workers=num_workers, seed=3)
    for _ in range(consumed):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON/checkpoint trip
    if num_workers == 0 and consumed > 7:
        assert all(lane["epoch"] >= 1 for lane in state["worker_states"][0]["lanes"])
    if num_workers == 2:
        assert state["next_worker"] == consumed % 2
    first.close()

    resumed = TokenLoader(shards["dir"], T, B, num_workers=num_workers, seed=3)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(more)]
    resumed.close()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.doc_ids, b.doc_ids)


def test_resume_state_must_match_layout(shards):
    state = TokenLoader(shards["dir"], T, B, num_workers=0).state_dict()
    other = TokenLoader(shards["dir"], T, B, num_workers=2)
    with pytest.raises(ValueError, match="saved with num_workers=1 but this loader has "
                                         "num_workers=2"):
        other.load_state_dict(state)


def test_eval_batches_are_deterministic_complete_and_padded(shards):
    first = list(iter_eval_batches(shards["dir"], T, B))
    again = list(iter_eval_batches(shards["dir"], T, B))
    assert len(first) == len(again)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    pad = shards["index"]["pad_id"]
    rows = np.concatenate([_rows(b) for b in first])
    rows[rows == IGNORE_INDEX] = pad  # a padded row's last token shows only as label -100
    last = first[-1]
    n_pad = int((rows[-1] == pad).sum())
    assert n_pad > 0 and (rows[-1][-n_pad:] == pad).all()
    assert (last.labels[-1, -n_pad:] == IGNORE_INDEX).all()
    assert last.labels[-1, -n_pad - 1] == shards["eos"]
    assert last.doc_ids[-1, -1] == last.doc_ids[-1].max()  # the pad run is its own "doc"
    stream = rows.reshape(-1)[: shards["index"]["num_tokens"]]
    expected = np.concatenate([ids for shard in shards["stored"] for ids in shard])
    assert stream.tolist() == expected.tolist()
    assert len(list(iter_eval_batches(shards["dir"], T, B, max_batches=2))) == 2


def test_vocab_mismatch_names_both_sizes(shards):
    with pytest.raises(ValueError, match="vocab size 320, but the model's vocab_size is 256"):
        TokenLoader(shards["dir"], T, B, vocab_size=256)
    with pytest.raises(ValueError, match="vocab size 320.*vocab_size is 300"):
        next(iter_eval_batches(shards["dir"], T, B, vocab_size=300))
    TokenLoader(shards["dir"], T, B, vocab_size=384)  # a padded model vocabulary is fine
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        TokenLoader(shards["dir"], T, B, tokenizer_sha256="0" * 64)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(ValueError, match=f"does not exist: {tmp_path / 'none'}"):
        TokenLoader(tmp_path / "none", T, B)
    with pytest.raises(ValueError, match=f"no token shards in {tmp_path}"):
        TokenLoader(tmp_path, T, B)
    with pytest.raises(ValueError, match=f"no token shards in {tmp_path}"):
        list(iter_eval_batches(tmp_path, T, B))


def test_too_few_shards_for_ranks_and_workers(shards):
    n = len(shards["stored"])
    with pytest.raises(ValueError, match=f"has {n} shard\\(s\\) but world_size=8 x "
                                         "num_workers=2 = 16 readers"):
        TokenLoader(shards["dir"], T, B, rank=1, world_size=8, num_workers=2)
