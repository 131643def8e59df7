"""The multimodal loader: whole media runs per row, exact resume (in-process and with worker
processes, through torch.save/load), rank/worker disjointness and coverage, mixture
weights, deterministic evaluation batches."""

from __future__ import annotations

import io

import pytest
import torch
from test_mm_common import mm_shards, photo_items, speech_items, tiny_encoders  # noqa: F401

from mmfm.data.mm_loader import (
    BadInputPolicy,
    MMLoader,
    ReaderPipeline,
    ShardSet,
    SourceReader,
    iter_mm_eval_batches,
)
from mmfm.data.mm_pack import IGNORE_INDEX
from mmfm.data.mm_shards import iter_raw_samples

IMG, AUD, IS, IE, AS, AE = 2, 3, 4, 5, 6, 7


def _loader(mm_shards, text_data, **kw) -> MMLoader:  # noqa: F811
    sources = [("photos", mm_shards / "photos" / "train", 1.0),
               ("speech", mm_shards / "speech" / "train", 1.0)]
    args = {"shuffle_buffer": 4, "seed": 3, **kw}
    return MMLoader(sources, text_data["tokenizer"], 64, 4, tiny_encoders(), **args)


def _assert_same(a, b) -> None:
    for name in ("input_ids", "labels", "doc_ids", "target_groups"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.media.keys() == b.media.keys()
    for m in a.media:
        for field in ("data", "lengths", "num_tokens"):
            assert torch.equal(getattr(a.media[m], field), getattr(b.media[m], field)), (m, field)


def test_rows_hold_whole_media_runs(mm_shards, text_data):  # noqa: F811
    loader = _loader(mm_shards, text_data)
    seen = {"image": 0, "audio": 0}
    for _ in range(6):
        batch = next(loader)
        assert batch.input_ids.shape == batch.labels.shape == (4, 64)
        for modality, ph, start, end in (("image", IMG, IS, IE), ("audio", AUD, AS, AE)):
            runs = []
            for row in batch.input_ids.tolist():
                i = 0
                while i < len(row):
                    if row[i] == ph:
                        j = i
                        while j < len(row) and row[j] == ph:
                            j += 1
                        assert i > 0 and row[i - 1] == start, "run without its start marker"
                        # the end marker follows (or is the row's last token: a label only)
                        assert j == len(row) or row[j] == end
                        runs.append(j - i)
                        i = j
                    else:
                        i += 1
            assert runs == batch.media[modality].num_tokens.tolist()
            seen[modality] += len(runs)
        media_tokens = torch.tensor([IMG, AUD, IS, IE, AS, AE])
        next_BT = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, -1:]], dim=1)
        as_label = torch.isin(next_BT, media_tokens)[:, :-1]  # label t is input t+1
        assert (batch.labels[:, :-1][as_label] == IGNORE_INDEX).all(), "media tokens are never targets"
        assert set(batch.target_groups[batch.labels != IGNORE_INDEX].unique().tolist()) <= {0, 1, 2}
    assert seen["image"] > 0 and seen["audio"] > 0


def test_resume_gives_the_same_batches(mm_shards, text_data):  # noqa: F811
    first = _loader(mm_shards, text_data)
    for _ in range(3):
        next(first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # the trainer's checkpoint path, weights_only on load
    expected = [next(first) for _ in range(4)]
    resumed = _loader(mm_shards, text_data)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for want in expected:
        _assert_same(next(resumed), want)


@pytest.mark.slow
def test_resume_with_worker_processes(mm_shards, text_data):  # noqa: F811
    first = _loader(mm_shards, text_data, num_workers=2)
    for _ in range(3):  # odd: the next batch is due from worker 1
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(3)]
    first.close()
    resumed = _loader(mm_shards, text_data, num_workers=2)
    resumed.load_state_dict(state)
    for want in expected:
        _assert_same(next(resumed), want)
    resumed.close()
    serial = _loader(mm_shards, text_data, num_workers=0)
    with pytest.raises(ValueError, match="num_readers"):
        serial.load_state_dict(state)


def _all_keys(src: ShardSet) -> list[str]:
    return [r.key for name in src.shards for r in iter_raw_samples(src.dir / name)]


def _epoch_keys(reader: SourceReader, epochs: int) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(epochs)]
    while True:
        (epoch, _, _), raw = reader.next_raw()
        if epoch >= epochs:
            return out
        out[epoch].append(raw.key)


@pytest.mark.parametrize("world_size,workers", [(2, 2), (3, 2), (1, 3)])
def test_readers_are_disjoint_and_cover_each_epoch(mm_shards, world_size, workers):  # noqa: F811
    src = ShardSet.open("photos", mm_shards / "photos" / "train")
    everything = sorted(_all_keys(src))
    readers = world_size * workers
    by_reader = []
    for rank in range(world_size):
        for worker in range(workers):
            reader = SourceReader(src, 0, 7, rank * workers + worker, readers, rank, world_size,
                                  BadInputPolicy(strict=True))
            assert reader.by_shard == (len(src.shards) >= readers)  # (3, 2): split by sample
            by_reader.append(_epoch_keys(reader, 2))
    for epoch in range(2):
        keys = [k for r in by_reader for k in r[epoch]]
        assert sorted(keys) == everything, "each sample exactly once per epoch"
        assert all(r[epoch] for r in by_reader), "every reader gets samples"


def test_mixture_follows_source_weights(mm_shards, text_data):  # noqa: F811
    loader = MMLoader([("photos", mm_shards / "photos" / "train", 3.0),
                       ("speech", mm_shards / "speech" / "train", 1.0)],
                      text_data["tokenizer"], 64, 2, tiny_encoders(), mixture="sample")
    pipeline = ReaderPipeline(loader.spec, 0, None)
    picks = [pipeline._pick_source() for _ in range(4000)]
    assert 0.72 < picks.count(0) / len(picks) < 0.78
    docs = {0: 0, 1: 0}
    for _ in range(40):
        pipeline._next_doc()
        docs[pipeline.carry[0]] += 1
    assert docs[0] > docs[1] > 0


def test_eval_batches_are_deterministic_and_padded(mm_shards, text_data):  # noqa: F811
    sources = [("photos", mm_shards / "photos" / "val"), ("speech", mm_shards / "speech" / "val")]
    a = list(iter_mm_eval_batches(sources, text_data["tokenizer"], 64, 3, tiny_encoders()))
    b = list(iter_mm_eval_batches(sources, text_data["tokenizer"], 64, 3, tiny_encoders()))
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b, strict=True):
        _assert_same(x, y)
    last = a[-1]
    assert (last.input_ids[-1] == 1).any(), "the last row is padded with <|pad|>"
    assert not any((x.labels == 1).any() for x in a), "padding is never a target"
    assert sum(len(x.media["image"]) for x in a) == 4 and sum(len(x.media["audio"]) for x in a) == 4
    assert len(list(iter_mm_eval_batches(sources, text_data["tokenizer"], 64, 3,
                                         tiny_encoders(), max_batches=1))) == 1


def test_loader_checks_vocab_and_layout(mm_shards, text_data):  # noqa: F811
    with pytest.raises(ValueError, match="model.vocab_size=100"):
        _loader(mm_shards, text_data, vocab_size=100)
    with pytest.raises(ValueError, match="no multimodal shards"):
        MMLoader([("x", mm_shards / "nope", 1.0)], text_data["tokenizer"], 64, 2, tiny_encoders())
    state = _loader(mm_shards, text_data).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loader(mm_shards, text_data, seed=4).load_state_dict(state)
