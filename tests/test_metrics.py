"""Metric sinks and MoE metric collection."""

import json

import pytest
import torch

from mmfm.config import ModelConfig
from mmfm.metrics import JsonlSink, MetricsLogger, collect_moe_metrics
from mmfm.model import Decoder
from mmfm.moe.config import MoEConfig


def test_jsonl_sink_appends_one_object_per_record(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    logger = MetricsLogger([JsonlSink(path)])
    logger.log(1, {"train/loss": 2.5})
    logger.log(2, {"train/loss": 2.0, "moe/layer_00/tokens_per_expert": [1, 2]})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"step": 1, "train/loss": 2.5},
                    {"step": 2, "train/loss": 2.0, "moe/layer_00/tokens_per_expert": [1, 2]}]


def test_moe_metrics_are_named_per_layer_and_summarized():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1,
                      ffn_hidden=32, max_seq_len=8,
                      moe=MoEConfig(num_experts=4, top_k=2, first_dense=1))
    model = Decoder(cfg).train()
    model(torch.randint(0, 50, (2, 8)))
    metrics = collect_moe_metrics(model)
    assert "moe/layer_00/load_imbalance" not in metrics  # layer 0 is dense
    counts = metrics["moe/layer_01/tokens_per_expert"]
    assert len(counts) == 4 and sum(counts) == 2 * 8 * 2
    imbalance = max(counts) / (sum(counts) / 4)
    assert metrics["moe/layer_01/load_imbalance"] == pytest.approx(imbalance)
    assert metrics["moe/max_load_imbalance"] == max(metrics["moe/layer_01/load_imbalance"],
                                                    metrics["moe/layer_02/load_imbalance"])
    # Reset after collection: nothing counted until the next training forward.
    again = collect_moe_metrics(model)
    assert sum(again["moe/layer_01/tokens_per_expert"]) == 0


def test_eval_forward_does_not_count_load():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      ffn_hidden=32, max_seq_len=8, moe=MoEConfig(num_experts=4, top_k=1))
    model = Decoder(cfg).eval()
    model(torch.randint(0, 50, (2, 8)))
    assert sum(collect_moe_metrics(model)["moe/layer_00/tokens_per_expert"]) == 0


@pytest.mark.slow
def test_wandb_offline_sink_writes_a_local_run(tmp_path, monkeypatch):
    from mmfm.metrics import WandbSink

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    sink = WandbSink("mmfm-test", "unit", tmp_path, "offline", {"a": 1})
    sink.write(1, {"train/loss": 1.5, "moe/layer_00/tokens_per_expert": [1, 2]})
    sink.close()
    assert list(tmp_path.rglob("*.wandb")), "no offline wandb run file written"


def test_progress_moves_the_bar_every_step_but_writes_no_records(tmp_path):
    from mmfm.metrics import ConsoleSink

    console = ConsoleSink(total_steps=10)
    logger = MetricsLogger([JsonlSink(tmp_path / "m.jsonl"), console])
    for step in (1, 2, 3):
        logger.progress(step, {"train/loss": 5.0, "perf/tokens_per_s": 1234.5})
    assert console._bar.n == 3
    assert "tokens_per_s" in console._bar.postfix and "loss" in console._bar.postfix
    logger.close()
    path = tmp_path / "m.jsonl"
    assert not path.exists() or path.read_text() == ""
