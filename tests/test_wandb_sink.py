"""W&B sink (offline, in tmp): MaxVio, load table/heatmap at evaluations, tokens x-axis, summary,
twin grouping, resume into the same run id; and the console's one-line imbalance summary."""

from __future__ import annotations

import pytest

from mmfm.metrics.sinks import imbalance_summary, maxvio_metrics, twin_group

RECORD = {"train/loss": 2.0, "tokens": 4096,
          "moe/layer_00/tokens_per_expert": [30.0, 10.0, 20.0, 20.0],
          "moe/layer_01/tokens_per_expert": [20.0, 20.0, 20.0, 20.0],
          "moe/layer_01/image/tokens_per_expert": [20.0, 20.0],
          "moe/dropped_fraction": 0.01}


def test_maxvio_and_console_line_from_planted_loads():
    vio = maxvio_metrics(RECORD)
    assert vio["moe/layer_00/maxvio"] == pytest.approx(0.5)  # (30 - 20) / 20
    assert vio["moe/layer_01/maxvio"] == 0.0 and vio["moe/maxvio"] == pytest.approx(0.5)
    assert vio["moe/layer_01/image/maxvio"] == 0.0
    line = imbalance_summary(RECORD)
    assert line == ("MoE MaxVio 0.50 (layer_00), coldest expert 0.50x uniform (layer_00), "
                    "dropped 1.0%")
    assert imbalance_summary({"train/loss": 1.0}) == ""


def test_twin_group_pairs_moe_with_dense():
    assert twin_group("text_moe") == twin_group("text_dense") == "text"
    assert twin_group("moe") == "moe"


@pytest.mark.slow
def test_wandb_sink_offline_logs_load_and_resumes_the_same_run(tmp_path, monkeypatch, text_data):
    from conftest import tiny_config

    from mmfm.metrics import WandbSink

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tiny_config(text_data, tmp_path).to_dict()
    sink = WandbSink("mmfm-test", "text_moe", tmp_path, "offline", config)
    logged = []
    original = sink._run.log
    sink._run.log = lambda data, step: (logged.append(data), original(data, step=step))
    sink.write(1, RECORD)
    sink.write(2, {"val/loss": 3.0, "tokens": 8192})
    assert logged[0]["moe/layer_00/maxvio"] == pytest.approx(0.5)
    assert "moe/expert_load" not in logged[0]  # the load table comes with evaluations
    table = logged[1]["moe/expert_load"]
    assert table.columns == ["layer", "expert", "share"] and len(table.data) == 10
    assert "moe/expert_load_heatmap" in logged[1]
    assert sink._run.summary["params/active"] < sink._run.summary["params/total"]
    assert sink._run.group == "text" and list(sink._run.tags) == ["moe"]
    first_id = sink._run.id
    sink.close()
    again = WandbSink("mmfm-test", "text_moe", tmp_path, "offline", config, resume=True)
    assert again._run.id == first_id
    again.close()
    fresh = WandbSink("mmfm-test", "text_moe", tmp_path, "offline", config)
    assert fresh._run.id != first_id
    fresh.close()


def test_console_sink_prints_the_imbalance_line_per_log_step(capsys):
    from mmfm.metrics import ConsoleSink

    sink = ConsoleSink(total_steps=10)
    sink.write(5, RECORD)
    sink.write(6, {"train/loss": 1.0})  # no MoE metrics: no line
    sink.close()
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "MaxVio" in line]
    assert lines == ["step 5: MoE MaxVio 0.50 (layer_00), coldest expert 0.50x uniform "
                     "(layer_00), dropped 1.0%"]
