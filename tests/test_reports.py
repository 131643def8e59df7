"""Routing capture, `mmfm analyze`, and the routing and comparison reports on real tiny runs:
files, numbers, bad input (each a one-line error naming the file), and the pages as a browser
opens them."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from mmfm.errors import MmfmError
from mmfm.report.capture import (
    HELDOUT,
    TRAIN_SAMPLES,
    analyze_run,
    capture_records,
    record_routing,
    records_path,
    routing_sample_batch,
)
from mmfm.report.compare import compare_report, reach
from mmfm.report.records import load_records
from mmfm.report.routing import routing_report

sys.path.insert(0, str(Path(__file__).parent))
import browser  # noqa: E402


@pytest.fixture(scope="module")
def runs(text_data, tmp_path_factory) -> dict[str, Path]:
    """A tiny MoE run with two checkpoints and its dense twin, trained on the same tokens."""
    from mmfm.train.trainer import Trainer

    root = tmp_path_factory.mktemp("runs")
    common = {"train.steps": 4, "train.eval_every": 2, "train.ckpt_every": 2,
              "train.keep_checkpoints": 5}
    for name, extra in (("moe", {}), ("dense", {"model.moe": "null"})):
        Trainer(tiny_config(text_data, root, **{"run.name": name, **common, **extra})).fit()
    return {"moe": root / "moe", "dense": root / "dense"}


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


# ----------------------------------------------------------------------------- capture


def test_captured_routing_is_what_each_router_chooses(text_data, tmp_path):
    """Compare with the routers themselves, called on each MoE layer's own input (captured by a
    separate pre-hook), not with the capture mechanism under test."""
    from mmfm.data.loader import iter_eval_batches

    cfg = tiny_config(text_data, tmp_path)
    model = cfg.model.build().eval()
    batch = next(iter(iter_eval_batches(text_data["val"], 64, 2)))
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, layer in model.moe_layers()]
    records = capture_records(model, [(batch, None)], step=3)
    for h in hooks:
        h.remove()
    assert records.layers_L.tolist() == [0, 1]
    for pos, (i, layer) in enumerate(model.moe_layers()):
        with torch.no_grad():
            r = layer.router(inputs[i].reshape(-1, cfg.model.d_model))
        assert np.array_equal(records.experts_LNK[pos], r.topk_idx_TK.numpy())
        np.testing.assert_allclose(records.weights_LNK[pos], r.topk_weight_TK.numpy(), rtol=1e-6)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.doc_ids).logits
    assert np.array_equal(records.predicted_N, logits.argmax(-1).flatten().numpy())
    assert np.array_equal(records.token_N, batch.input_ids.flatten().numpy())
    assert records.sources == list(batch.sources)
    assert not model.training


def test_record_routing_hook_writes_a_records_file(text_data, tmp_path):
    from mmfm.data.loader import iter_eval_batches

    model = tiny_config(text_data, tmp_path).model.build().train()
    batch = next(iter(iter_eval_batches(text_data["val"], 64, 2)))
    path = record_routing(model, batch, 40, records_path(tmp_path, TRAIN_SAMPLES, 40))
    assert path == tmp_path / "routing" / "train" / "step_00000040.npz"
    back = load_records(path)
    assert back.step == 40 and back.num_tokens == 128 and back.extra["kind"] == "train"
    assert model.training  # left as it was
    assert all(not layer.router._forward_hooks for _, layer in model.moe_layers())


def test_report_from_training_samples_when_analyze_was_not_run(runs, text_data, tmp_path):
    """The trainer's hook on a fixed batch at two steps is enough for saturation and the rest."""
    from mmfm.data.loader import iter_eval_batches
    from mmfm.report.capture import _load_model_from_checkpoint

    run = _copy(runs["moe"], tmp_path, "moe")
    batch = routing_sample_batch(iter_eval_batches(text_data["val"], 64, 4), tokens=300)
    assert batch.input_ids.shape == (5, 64)  # whole rows covering 300 tokens
    for step in (2, 4):
        _, model = _load_model_from_checkpoint(run / "checkpoints" / f"step_{step:08d}")
        record_routing(model, batch, step, records_path(run, TRAIN_SAMPLES, step))
    _, json_path = routing_report(run)
    numbers = json.loads(json_path.read_text())
    assert numbers["records"] == "train" and numbers["saturation"]["steps"] == [2, 4]


def test_routing_trace_every_is_validated(text_data, tmp_path):
    with pytest.raises(MmfmError, match="metrics.routing_trace_every=-1 must be >= 0"):
        tiny_config(text_data, tmp_path, **{"metrics.routing_trace_every": -1})


# ----------------------------------------------------------------------------- analyze


def test_analyze_all_checkpoints_routes_the_same_tokens(runs, tmp_path):
    run = _copy(runs["moe"], tmp_path, "moe")
    paths = analyze_run(run, ["all"], tokens=512)
    assert [p.name for p in paths] == ["step_00000002.npz", "step_00000004.npz"]
    a, b = (load_records(p) for p in paths)
    assert np.array_equal(a.token_N, b.token_N) and a.num_tokens == 512
    assert set(a.sources) == {"licenses", "stdlib", "stdlib_email"}
    assert len(set(a.source_N.tolist()) - {-1}) == 3  # balanced: every source is represented
    assert analyze_run(run, ["2"], tokens=64)[0] == records_path(run, HELDOUT, 2)


def test_analyze_bad_inputs_are_one_line_naming_the_file(runs, tmp_path):
    dense = _copy(runs["dense"], tmp_path, "dense")
    with pytest.raises(MmfmError, match=f"checkpoint {dense}/checkpoints/step_00000004 is of a "
                                        "dense model"):
        analyze_run(dense)
    empty = _copy(runs["moe"], tmp_path, "empty")
    shutil.rmtree(empty / "checkpoints")
    with pytest.raises(MmfmError, match=f"run {empty} has no checkpoints"):
        analyze_run(empty)
    foreign = _copy(runs["moe"], tmp_path, "foreign")
    shutil.rmtree(foreign / "checkpoints" / "step_00000004")
    shutil.copytree(dense / "checkpoints" / "step_00000004", foreign / "checkpoints" / "step_00000004")
    with pytest.raises(MmfmError, match="step_00000004 is of another model") as err:
        analyze_run(foreign)
    assert "\n" not in str(err.value)
    with pytest.raises(MmfmError, match="no checkpoint for step"):
        analyze_run(_copy(runs["moe"], tmp_path, "m2"), ["7"])


# ----------------------------------------------------------------------------- reports


def test_routing_report_page_and_numbers(runs, tmp_path):
    run = _copy(runs["moe"], tmp_path, "moe")
    analyze_run(run, ["all"], tokens=512)
    html, json_path = routing_report(run)
    numbers = json.loads(json_path.read_text())
    assert numbers["records"] == "heldout" and numbers["record_steps"] == [2, 4]
    assert numbers["saturation"]["top1"][-1] == [1.0, 1.0]  # the final step against itself
    assert set(numbers["load_over_training"]) == {"layer_00", "layer_01"}
    assert len(numbers["heldout_load"]["counts"][0]) == 4
    assert set(numbers["specialization_by_source"]["groups"]) == {"licenses", "stdlib",
                                                                  "stdlib_email"}
    text = html.read_text()
    assert "random routing gives" in text and 'src="data:image/png;base64,' in text
    assert 'src="http' not in text and "<script" not in text  # self-contained, nothing fetched
    reason = browser.skip_reason()
    if reason:
        pytest.skip(reason)
    seen = browser.check_page(html, tmp_path / "routing.png")
    assert len(seen.images) >= 10 and "Router saturation" in seen.text


def test_routing_report_without_records_points_to_analyze(runs, tmp_path):
    html, json_path = routing_report(_copy(runs["moe"], tmp_path, "moe"))
    assert json.loads(json_path.read_text())["records"] == "none"
    assert "mmfm analyze RUN" in html.read_text()


def test_routing_report_bad_inputs(runs, tmp_path):
    dense = _copy(runs["dense"], tmp_path, "dense")
    with pytest.raises(MmfmError, match=f"run {dense} has no MoE layers .*{dense}/config.yaml"):
        routing_report(dense)
    run = _copy(runs["moe"], tmp_path, "moe")
    path = analyze_run(run, tokens=128)[0]
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(MmfmError, match=f"routing records {path} are truncated") as err:
        routing_report(run)
    assert "\n" not in str(err.value)
    with pytest.raises(MmfmError, match="does not exist"):
        routing_report(tmp_path / "nope")


def test_reach_interpolates_between_evaluations():
    assert reach([100, 200, 300], [5.0, 4.0, 3.0], 3.5) == pytest.approx(250)
    assert reach([100, 200], [5.0, 4.0], 5.5) == 100
    assert reach([100, 200], [5.0, 4.0], 3.9) is None


def test_compare_report_moe_vs_dense(runs, tmp_path):
    html, json_path = compare_report([runs["moe"], runs["dense"]], out_dir=tmp_path / "cmp")
    numbers = json.loads(json_path.read_text())
    assert [r["name"] for r in numbers["runs"]] == ["moe", "dense"]
    assert numbers["runs"][0]["steps"] == [2, 4] and numbers["runs"][0]["finished"]
    assert "model.moe.num_experts" in numbers["config_differences"]
    pair = next(r for r in numbers["reach"] if r["run"] == "moe")
    assert pair["reaches"] == "dense"
    moe = numbers["runs"][0]
    # Without a logged `flops`, the FLOPs axis is tokens x the config's FLOPs per token.
    assert moe["flops"][0] / moe["tokens"][0] == pytest.approx(moe["flops"][1] / moe["tokens"][1])
    reason = browser.skip_reason()
    if reason:
        pytest.skip(reason)
    seen = browser.check_page(html, tmp_path / "compare.png")
    # loss against tokens, FLOPs and wall-clock, and per source once the trainer logs sources
    assert len(seen.images) == html.read_text().count("<img") >= 3
    assert "Configurations" in seen.text


def test_compare_refuses_other_tokenizer_and_val_set(runs, tmp_path, text_data):
    from mmfm.data.tokenizer import train_tokenizer

    other = _copy(runs["dense"], tmp_path, "other")
    cfg = (other / "config.yaml").read_text()
    tok = train_tokenizer(["a different corpus " * 50, "other words here"], vocab_size=300,
                          out_path=tmp_path / "tok.json")
    del tok
    (other / "config.yaml").write_text(cfg.replace(str(text_data["tokenizer"]), str(tmp_path / "tok.json")))
    with pytest.raises(MmfmError, match="different tokenizers"):
        compare_report([runs["moe"], other], out_dir=tmp_path / "cmp")
    shutil.copytree(text_data["train"], tmp_path / "val2")
    (other / "config.yaml").write_text(cfg.replace(str(text_data["val"]), str(tmp_path / "val2")))
    with pytest.raises(MmfmError, match="validated on different data"):
        compare_report([runs["moe"], other], out_dir=tmp_path / "cmp")


def test_compare_in_progress_run_stops_at_its_last_evaluation(runs, tmp_path):
    partial = _copy(runs["moe"], tmp_path, "partial")
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    first_eval = next(i for i, line in enumerate(lines) if '"val/loss"' in line)
    (partial / "metrics.jsonl").write_text("\n".join(lines[:first_eval + 1]) + '\n{"step": 3, "tr')
    _, json_path = compare_report([runs["dense"], partial], out_dir=tmp_path / "cmp")
    run = json.loads(json_path.read_text())["runs"][1]
    assert run["steps"] == [2] and not run["finished"]


def test_cli_register_parses_analyze_and_reports(runs, tmp_path, capsys):
    from mmfm.report.cli import register

    parser = argparse.ArgumentParser(prog="mmfm")
    register(parser.add_subparsers(dest="command", required=True))
    run = _copy(runs["moe"], tmp_path, "moe")
    args = parser.parse_args(["analyze", str(run), "--checkpoints", "all", "--tokens", "128"])
    assert args.func(args) == 0
    args = parser.parse_args(["report", "routing", str(run)])
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    html = next(line for line in out if line.endswith("reports/routing.html"))
    assert Path(html).is_file()
    assert any(line.startswith("held-out load at step 4: worst global MaxVio") for line in out)
    args = parser.parse_args(["analyze", str(run), "--data", "bad"])
    with pytest.raises(MmfmError, match="NAME=SHARDS_DIR"):
        args.func(args)


def test_compare_reads_logged_tokens_flops_wall_and_per_source_losses(runs, tmp_path):
    """With the keys the trainer logs (`tokens`, `flops`, `time/wall_s`, `val/loss/<source>`),
    planted curves give known reach ratios: B reaches A's final loss 2.0 halfway between its
    evaluations at 100 and 200 tokens, i.e. at 150 tokens where A needed 300."""
    a, b = _copy(runs["moe"], tmp_path, "a"), _copy(runs["dense"], tmp_path, "b")
    curves = {a: [(100, 3.0), (300, 2.0)], b: [(100, 2.5), (200, 1.5)]}
    for run, points in curves.items():
        rows = [{"step": i + 1, "val/loss": loss, "tokens": t, "flops": 10 * t,
                 "time/wall_s": t / 100, "val/loss/code": loss + 1}
                for i, (t, loss) in enumerate(points)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html, json_path = compare_report([a, b], out_dir=tmp_path / "cmp")
    numbers = json.loads(json_path.read_text())
    assert numbers["runs"][0]["approximate"] == []
    b_reaches_a = next(r for r in numbers["reach"] if r["run"] == "b")
    assert b_reaches_a["tokens"] == pytest.approx(150)
    assert b_reaches_a["tokens_ratio"] == pytest.approx(0.5)
    assert b_reaches_a["flops_ratio"] == pytest.approx(0.5)
    assert b_reaches_a["wall_s_ratio"] == pytest.approx(0.5)
    a_reaches_b = next(r for r in numbers["reach"] if r["run"] == "a")
    assert a_reaches_b["tokens"] is None  # A never gets down to 1.5
    assert numbers["runs"][1]["val_loss_by_source"]["code"] == [[100, 3.5], [200, 2.5]]
    assert "val loss on code" not in html.read_text()  # figures are images, captions say it
    assert "source code" in html.read_text()
