"""Routing capture and reports on the multimodal model: placeholder tokens carry their modality,
shared routing and modality expert groups (MoMa, global expert ids) are captured, validation
batches name their shard set as the source (per-source losses, records' sources), and the tiny
multimodal preset trains, is analysed and reported end to end."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from test_mm_common import mm_shards, photo_items, speech_items  # noqa: F401 (fixtures)
from test_mm_train import mm_config

from mmfm.config import load_config
from mmfm.data.mm_pack import IGNORE_INDEX
from mmfm.data.tokenizer import PAD, load_tokenizer, special_token_ids
from mmfm.metrics.sources import SourceLosses
from mmfm.moe.modality import ModalityExperts
from mmfm.report import analysis as A
from mmfm.report.capture import TRAIN_SAMPLES, capture_records, records_path
from mmfm.report.records import load_records
from mmfm.train.task import build_task

sys.path.insert(0, str(Path(__file__).parent))
import browser  # noqa: E402


def test_multimodal_records_carry_modality(mm_shards, text_data, tmp_path):  # noqa: F811
    cfg = mm_config(mm_shards, text_data, tmp_path, **{"multimodal.moe_routing": "shared"})
    task = build_task(cfg)
    model = task.build_model()
    batches = list(task.eval_batches())
    records = capture_records(model, [(b, None) for b in batches], step=0)
    image_id = model.placeholder_ids["image"]
    is_image_N = records.token_N == image_id
    assert is_image_N.any()
    assert (records.modality_N[is_image_N] == 1).all()
    assert (records.modality_N[~np.isin(records.token_N, list(model.placeholder_ids.values()))]
            == 0).all()
    assert records.expert_groups is None and records.sources == ["photos", "speech"]
    spec = A.specialization(records, records.modality_N.astype(np.int16), ["text", "image", "audio"])
    assert "image" in spec["groups"] and 0.0 <= spec["score"][0] <= 1.0


def test_modality_expert_groups_record_global_expert_ids(mm_shards, text_data, tmp_path):  # noqa: F811
    """Compared with each group's router called on the layer's own input (captured by a
    separate pre-hook), not with the capture mechanism under test."""
    cfg = mm_config(mm_shards, text_data, tmp_path)  # moe_routing=modality {text 2, image 1, audio 1}
    task = build_task(cfg)
    model = task.build_model().eval()
    batch = next(iter(task.eval_batches()))
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, i=i: inputs.__setitem__(i, (args[0].detach(), args[1])))
        for i, layer in model.moe_layers()]
    records = capture_records(model, [(batch, None)], step=0)
    for h in hooks:
        h.remove()
    assert records.num_experts == 4 and records.top_k == 1
    assert records.expert_groups == {"text": (0, 2), "image": (2, 1), "audio": (3, 1)}
    for pos, (i, layer) in enumerate(model.moe_layers()):
        assert isinstance(layer, ModalityExperts)
        x_BSD, modality_BS = inputs[i]
        x_TD, modality_T = x_BSD.reshape(-1, x_BSD.shape[-1]), modality_BS.reshape(-1)
        for m, (name, offset) in enumerate((("text", 0), ("image", 2), ("audio", 3))):
            sel_T = modality_T == m
            with torch.no_grad():
                r = layer.groups[name].router(x_TD[sel_T])
            assert np.array_equal(records.experts_LNK[pos][sel_T.numpy()],
                                  r.topk_idx_TK.numpy() + offset)
    placeholder = model.placeholder_ids
    assert (records.experts_LNK[:, records.token_N == placeholder["image"]] == 2).all()
    assert (records.experts_LNK[:, records.token_N == placeholder["audio"]] == 3).all()
    assert (records.experts_LNK[:, records.modality_N == 0] < 2).all()
    # The analyses see all 4 experts; each modality has experts of its own by construction.
    group_N = np.where(records.source_N >= 0, records.modality_N.astype(np.int16), -1)
    spec = A.specialization(records, group_N, ["text", "image", "audio"])
    assert np.allclose(spec["score"], 1.0) and spec["uniform"] is None
    assert spec["uniform_by_group"] == {"text": 0.5, "image": 1.0, "audio": 1.0}
    assert A.expert_counts(records).shape == (2, 4)


def test_dead_and_hot_measure_load_within_each_expert_group():
    """Planted: text experts 0-1 balanced (45/45), image experts 2-4 at 1/8/1 of 10."""
    counts_LE = np.array([[45, 45, 1, 8, 1]])
    groups = [("text", 0, 2), ("image", 2, 3)]
    found = A.dead_and_hot(counts_LE, [0], dead_below=0.5, hot_above=2.0, groups=groups)
    assert [(d["expert"], d["group"]) for d in found["dead"]] == [(2, "image"), (4, "image")]
    assert [(d["expert"], d["load_vs_uniform"]) for d in found["hot"]] == [(3, 2.4)]
    # Over one pool of 5 the balanced text experts would look hot and image expert 3 normal.
    pooled = A.dead_and_hot(counts_LE, [0], dead_below=0.5, hot_above=2.0)
    assert {d["expert"] for d in pooled["hot"]} == {0, 1}
    assert A.group_maxvio(counts_LE[0], groups) == {"text": 0.0, "image": pytest.approx(1.4)}


def test_validation_batches_name_their_shard_set(mm_shards, text_data, tmp_path):  # noqa: F811
    cfg = mm_config(mm_shards, text_data, tmp_path)
    task = build_task(cfg)
    model = task.build_model().eval()
    pad = special_token_ids(load_tokenizer(cfg.data.tokenizer))[PAD]
    ids = model.placeholder_ids
    by_source, total, count = SourceLosses(), 0.0, 0
    for batch in task.eval_batches():
        assert batch.sources == ("photos", "speech")
        assert batch.source_ids.shape == batch.input_ids.shape
        assert torch.equal(batch.source_ids < 0, batch.input_ids == pad)  # padding only
        assert (batch.source_ids[batch.input_ids == ids["image"]] == 0).all()
        assert (batch.source_ids[batch.input_ids == ids["audio"]] == 1).all()
        with torch.no_grad():
            out = task.loss(model, batch)
        assert out.token_loss_BT is not None and out.token_loss_BT.shape == batch.labels.shape
        by_source.add_batch(batch, out.token_loss_BT)
        total += float(out.lm_loss) * out.num_targets
        count += out.num_targets
        assert (batch.labels[batch.source_ids < 0] == IGNORE_INDEX).all()
    metrics = by_source.metrics()
    assert set(metrics) == {"val/loss/photos", "val/loss/speech"}
    # Every target has a source, so the per-source means recombine to the overall mean.
    assert sum(by_source.sums.values()) / sum(by_source.counts.values()) == pytest.approx(
        total / count, rel=1e-5)


def _tiny_preset(mm_shards, text_data, tmp_path) -> Path:  # noqa: F811
    """configs/mm_moe_tiny.yaml (MoMa 8 text + 4 image + 4 audio experts, top-2, 4 layers)
    with the fixture's shard sets and tokenizer in place of the demo's."""
    preset = yaml.safe_load((ROOT / "configs" / "mm_moe_tiny.yaml").read_text())
    preset["multimodal"]["sources"] = {
        name: {"train": str(mm_shards / name / "train"), "val": str(mm_shards / name / "val"),
               "weight": 1.0} for name in ("photos", "speech")}
    path = tmp_path / "mm_moe_tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.mark.slow
def test_tiny_multimodal_preset_is_analysed_and_reported(mm_shards, text_data, tmp_path,  # noqa: F811
                                                         capsys):
    from mmfm.report.cli import register
    from mmfm.train.trainer import Trainer

    cfg = load_config(_tiny_preset(mm_shards, text_data, tmp_path), [
        f"run.out_dir={tmp_path}", "run.name=mm", f"data.tokenizer={text_data['tokenizer']}",
        "data.num_workers=0", "train.steps=4", "train.warmup_steps=1", "train.eval_every=2",
        "train.ckpt_every=2", "train.keep_checkpoints=5", "train.log_every=1",
        "train.eval_batches=2", "train.micro_batch_size=4", "train.precision=fp32",
        "metrics.console=false", "metrics.routing_trace_every=2"])
    assert cfg.multimodal.moe_routing == "modality" and cfg.model.moe.top_k == 2
    result = Trainer(cfg).fit()
    run = result.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    val = [r for r in rows if "val/loss" in r][-1]
    assert {"val/loss/photos", "val/loss/speech"} <= set(val)  # per shard set
    sample = load_records(records_path(run, TRAIN_SAMPLES, 4))  # the trainer's routing samples
    assert sample.expert_groups == {"text": (0, 8), "image": (8, 4), "audio": (12, 4)}
    assert sample.sources == ["photos", "speech"] and sample.num_experts == 16

    parser = argparse.ArgumentParser(prog="mmfm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", str(run), "--checkpoints", "all", "--tokens", "2048"])
    assert args.func(args) == 0
    args = parser.parse_args(["report", "routing", str(run)])
    assert args.func(args) == 0
    headlines = capsys.readouterr().out
    assert "worst MaxVio per expert group text" in headlines
    assert "source specialization score within the text experts" in headlines
    assert "(random text 0.25, image 0.50, audio 0.50)" in headlines

    numbers = json.loads((run / "reports" / "routing.json").read_text())
    assert numbers["records"] == "heldout" and numbers["record_steps"] == [2, 4]
    assert numbers["moe_layers"] == [0, 1, 2, 3]
    load = numbers["heldout_load"]
    assert load["expert_groups"] == {"text": [0, 8], "image": [8, 4], "audio": [12, 4]}
    assert len(load["counts"][0]) == 16 and set(load["maxvio_by_group"][0]) == {
        "text", "image", "audio"}
    assert {d.get("group") for d in load["dead"] + load["hot"]} <= {"text", "image", "audio"}
    by_modality = numbers["specialization_by_modality"]
    assert by_modality["groups"] == ["text", "image", "audio"]
    assert len(by_modality["score"]) == 4 and np.allclose(by_modality["score"], 1.0)
    assert by_modality["uniform_by_group"] == {"text": 2 / 8, "image": 2 / 4, "audio": 2 / 4}
    by_source = numbers["specialization_by_source"]
    assert by_source["groups"] == ["photos", "speech"] and len(by_source["score"]) == 4
    assert set(numbers["specialization_by_source_within_group"]) == {"text", "image", "audio"}
    assert len(numbers["coactivation"][0]) == 16
    assert set(numbers["consecutive"]["baseline_by_group"]) == {"text", "image", "audio"}
    assert {p["source"] for p in numbers["token_view"]["passages"]} == {"photos", "speech"}
    assert set(numbers["load_over_training"]) >= {"layer_00/text", "layer_00/image",
                                                  "layer_00/audio"}

    html = run / "reports" / "routing.html"
    text = html.read_text()
    assert "Specialization by modality" in text and "per expert group" in text
    assert 'src="http' not in text and "<script" not in text
    reason = browser.skip_reason()
    if reason:
        pytest.skip(reason)
    seen = browser.check_page(html, tmp_path / "mm_routing.png")
    assert "Specialization by modality" in seen.text and "photos" in seen.text
    assert len(seen.images) >= 10
