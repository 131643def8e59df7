"""Per-source data: validation batches say each token's source, and per-source losses are the
token-weighted means of exactly that source's tokens."""

from __future__ import annotations

import pytest
import torch

from mmfm.data.loader import iter_eval_batches
from mmfm.data.shards import write_token_shards
from mmfm.metrics.sources import SourceLosses
from mmfm.model import IGNORE_INDEX


def _sources_by_webdataset(shards_dir) -> list[str]:
    """Each stored token's source, read with webdataset itself (not mmfm's reader)."""
    import webdataset as wds

    from mmfm.data.shards import read_index

    urls = [str(shards_dir / s["name"]) for s in read_index(shards_dir)["shards"]]
    out: list[str] = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        out += [sample["json"].get("source", "unknown")] * len(sample["ids.npy"])
    return out


def test_eval_batches_carry_each_tokens_source(text_data):
    T = 64
    expected = _sources_by_webdataset(text_data["val"])
    got: list[str] = []
    for batch in iter_eval_batches(text_data["val"], T, 4):
        assert batch.source_ids.shape == batch.input_ids.shape
        got += [batch.sources[s] if s >= 0 else "<pad>" for s in batch.source_ids.flatten().tolist()]
    # Rows are T+1 stored tokens cut without overlap; a row's inputs are its first T tokens.
    want = [src for r in range(0, len(expected), T + 1) for src in expected[r:r + T]]
    assert got[:len(want)] == want and set(got[len(want):]) <= {"<pad>"}
    assert len(set(want)) == 3


def test_old_shards_without_sources_read_as_unknown(tmp_path, text_data):
    docs = [{"text": "alpha beta gamma " * 20}, {"text": "delta " * 30}]
    write_token_shards(docs, text_data["tokenizer"], tmp_path / "s")
    batch = next(iter(iter_eval_batches(tmp_path / "s", 16, 2)))
    assert batch.sources == ("unknown",)
    assert set(batch.source_ids.unique().tolist()) <= {0, -1}


def test_source_losses_are_token_weighted_means_of_planted_losses():
    loss_BT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    labels_BT = torch.tensor([[1, 1, IGNORE_INDEX], [1, 1, 1]])
    source_BT = torch.tensor([[0, 1, 1], [1, 1, -1]], dtype=torch.int16)
    meter = SourceLosses()
    meter.add(loss_BT, labels_BT, source_BT, ("code", "prose"))
    meter.add(torch.tensor([[10.0]]), torch.tensor([[1]]), torch.tensor([[0]]), ("code", "prose"))
    out = meter.metrics()
    assert out["val/loss/code"] == pytest.approx((1 + 10) / 2)
    assert out["val/loss/prose"] == pytest.approx((2 + 4 + 5) / 3)  # 3.0 ignored, 6.0 is pad


def test_source_losses_ignore_batches_without_sources():
    meter = SourceLosses()
    meter.add(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.long), None, ())
    assert meter.metrics() == {}


def test_per_source_losses_of_a_real_model_average_to_the_overall_loss(text_data, tmp_path):
    """As the trainer's evaluate would call it: the token-weighted mean of val/loss/<source>
    equals the overall validation loss."""
    from conftest import tiny_config

    from mmfm.train.task import TextTask

    task = TextTask(tiny_config(text_data, tmp_path))
    model = task.build_model().eval()
    meter, total, count = SourceLosses(), 0.0, 0
    with torch.no_grad():
        for batch in task.eval_batches():
            out = task.loss(model, batch)
            meter.add_batch(batch, out.token_loss_BT)
            total += out.lm_loss.item() * out.num_targets
            count += out.num_targets
    per_source = meter.metrics()
    assert set(per_source) == {f"val/loss/{s}" for s in batch.sources if s in meter.counts}
    weighted = sum(meter.sums.values()) / sum(meter.counts.values())
    assert weighted == pytest.approx(total / count, rel=1e-5)
    assert sum(meter.counts.values()) == count
