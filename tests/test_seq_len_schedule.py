"""`train.seq_len_schedule`: config rules, the loader's repacking at a switch, RoPE under a
schedule, metrics, and exact resume across the switch (one process, and two over gloo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config, tiny_overrides

from mmfm.config import ConfigError, ModelConfig, load_config
from mmfm.data.loader import Batch, TokenLoader
from mmfm.errors import UserValueError
from mmfm.model import Decoder
from mmfm.model.rope import RopeScalingConfig, rope_cos_sin
from mmfm.seq_len import SeqLenSchedule, validate_seq_len_schedule
from mmfm.train import Trainer

SWITCH = "[{step: 3, seq_len: 64}]"  # 16-token rows (data.seq_len) for 3 steps, then 64
YARN = "{type: yarn, factor: 2.0, original_max_seq_len: 32}"  # 16 plain RoPE, 64 scaled


def _cfg(text_data, run_dir, **extra):
    values = {"data.seq_len": 16, "train.micro_batch_size": 8, "train.seq_len_schedule": SWITCH,
              "model.rope_scaling": YARN, "train.eval_every": 3, "train.ckpt_every": 2}
    values.update(extra)
    return tiny_config(text_data, run_dir, **values)


# ----------------------------------------------------------------------------- config

BAD = [
    ({"train.seq_len_schedule": "[{step: 0, seq_len: 16}, {step: 0, seq_len: 32}]"},
     "train.seq_len_schedule[1].step=0 must be greater than train.seq_len_schedule[0].step=0"),
    ({"train.seq_len_schedule": "[{step: 0, seq_len: 0}]"},
     "train.seq_len_schedule[0].seq_len=0 must be > 0"),
    ({"train.seq_len_schedule": "[{step: 2, seq_len: 128}]"},
     "train.seq_len_schedule[0].seq_len=128 exceeds model.max_seq_len=64"),
    ({"train.seq_len_schedule": "[{step: 6, seq_len: 32}]"},
     "train.seq_len_schedule[0].step=6 is not below train.steps=6"),
    ({"train.seq_len_schedule": "[{step: 0, seq_len: 16}, {step: 2, seq_len: 48}]"},
     "train.seq_len_schedule[1].seq_len=48 does not divide the 64 tokens of a micro-batch "
     "(train.micro_batch_size=4 × train.seq_len_schedule[0].seq_len=16)"),
    ({"data.seq_len": 64, "train.seq_len_schedule": "[{step: 2, seq_len: 24}]"},
     "train.seq_len_schedule[0].seq_len=24 does not divide the 256 tokens of a micro-batch "
     "(train.micro_batch_size=4 × data.seq_len=64)"),
    ({"train.seq_len_schedule": "[{step: 0, seq_len: 16}, {step: 2, seq_len: 64}]",
      "model.rope_scaling": "{type: linear, factor: 1.5, original_max_seq_len: 32}"},
     "train.seq_len_schedule[1].seq_len=64 exceeds the reach of model.rope_scaling (type=linear):"
     " original_max_seq_len=32 × factor=1.5 = 48"),
    ({"train.seq_len_schedule": "[{step: 0, seq_len: 16}, {step: 2, seq_len: 32}]",
      "model.rope_scaling": "{type: llama3, factor: 8.0, original_max_seq_len: 32}"},
     "train.seq_len_schedule: the last stage's seq_len=32 does not exceed "
     "model.rope_scaling.original_max_seq_len=32, so model.rope_scaling would never be trained"),
    ({"train.seq_len_schedule": "[{step: 0, seqlen: 16}]"}, "seqlen"),
    ({"train.seq_len_schedule": "[{step: 0, seq_len: 16}, {step: 2, seq_len: 33}]",
      "parallel.cp": 2},
     "train.seq_len_schedule[1].seq_len=33 is not divisible by parallel.cp=2"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_schedules_are_one_line_errors_naming_the_field(text_data, tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(text_data, tmp_path, **extra)
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_pipeline_parallel_is_refused(text_data, tmp_path):
    with pytest.raises(ConfigError, match=r"does not work with parallel.pp=2"):
        tiny_config(text_data, tmp_path, **{"train.seq_len_schedule": "[{step: 2, seq_len: 32}]",
                                            "parallel.pp": 2, "parallel.microbatches": 2,
                                            "parallel.engine": "ddp"})


@pytest.mark.parametrize("section, field, value, message", [
    ("parallel", "engine", "deepspeed", "train.seq_len_schedule is not supported with "
                                        "parallel.engine=deepspeed"),
    ("data", "kind", "multimodal", "train.seq_len_schedule is supported for data.kind=text only"),
])
def test_layouts_the_schedule_does_not_support_are_named(text_data, tmp_path, section, field,
                                                         value, message):
    # Set after loading: a config file would first fail on the missing deepspeed package or
    # multimodal section; the schedule's own rule is what is tested here.
    cfg = _cfg(text_data, tmp_path)
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(UserValueError, match=message):
        validate_seq_len_schedule(cfg)


def test_schedule_resolves_rows_tokens_and_flops(text_data, tmp_path):
    cfg = _cfg(text_data, tmp_path, **{"train.grad_accum": 2})
    schedule = SeqLenSchedule.from_config(cfg)
    assert [(s.start_step, s.seq_len, s.rows) for s in schedule.stages] == [(0, 16, 8), (3, 64, 2)]
    assert schedule.lanes == 8 and schedule.is_scheduled
    assert schedule.loader_stages(2) == [(0, 16, 8), (6, 64, 2)]
    assert schedule.at(2).seq_len == 16 and schedule.at(3).seq_len == 64
    assert schedule.tokens_through(5, 2) == 5 * 2 * 128  # tokens per step kept
    assert schedule.flops_through(5, 2, lambda t: t) == 3 * 2 * 128 * 16 + 2 * 2 * 128 * 64
    fixed = _cfg(text_data, tmp_path, **{"train.keep_tokens_per_step": False,
                                         "train.seq_len_schedule": "[{step: 3, seq_len: 48}]"})
    assert [s.rows for s in SeqLenSchedule.from_config(fixed).stages] == [8, 8]


# ----------------------------------------------------------------------------- loader

def _rows(batch: Batch) -> np.ndarray:
    """The (rows, T+1) token rows a batch was cut from."""
    return torch.cat([batch.input_ids, batch.labels[:, -1:]], dim=1).numpy()


@pytest.mark.parametrize("stages", [[(0, 16, 8), (3, 64, 2)], [(0, 64, 2), (2, 16, 8)],
                                    [(0, 16, 6), (2, 32, 3), (5, 24, 4)]])
def test_repacking_continues_every_lane_stream_exactly(text_data, stages):
    """Per lane, the rows of every batch before and after each switch, concatenated, are that
    lane's token stream (read by an unscheduled loader with one long row per lane): nothing
    skipped, nothing read twice; doc_ids restart per row and step at document boundaries."""
    lanes = max(rows for _, _, rows in stages)
    loader = TokenLoader(text_data["train"], stages[0][1], stages[0][2],
                         seq_len_stages=stages)
    batches = [next(loader) for _ in range(9)]
    reference = next(TokenLoader(text_data["train"], 2047, lanes))  # one 2048-token row a lane
    ref_rows, ref_docs = _rows(reference), reference.doc_ids.numpy()
    read = [0] * lanes  # tokens of each lane's stream consumed so far
    cursor = 0
    for index, batch in enumerate(batches):
        _, seq_len, rows = [s for s in stages if s[0] <= index][-1]
        assert batch.input_ids.shape == (rows, seq_len), index
        for i, row in enumerate(_rows(batch)):
            lane = (cursor + i) % lanes
            start = read[lane]
            np.testing.assert_array_equal(row, ref_rows[lane, start:start + seq_len + 1])
            expected_docs = ref_docs[lane, start:start + seq_len] - ref_docs[lane, start]
            np.testing.assert_array_equal(batch.doc_ids[i].numpy(), expected_docs)
            read[lane] += seq_len + 1
        cursor = (cursor + rows) % lanes
    assert sum(read) == sum(b.input_ids.numel() + b.input_ids.shape[0] for b in batches)


def test_loader_with_workers_resumes_across_the_switch(text_data):
    """Two DataLoader workers: every batch has the shape of its stage (the round-robin index
    is right), and a loader restored from a state saved before or after the switch returns the
    batches the uninterrupted one does."""
    stages = [(0, 16, 8), (3, 64, 2)]

    def make():
        return TokenLoader(text_data["train"], 16, 8, num_workers=2, seq_len_stages=stages)

    loader = make()
    full, states = [], []
    for _ in range(7):
        states.append(loader.state_dict())
        full.append(next(loader))
    loader.close()
    assert [tuple(b.input_ids.shape) for b in full] == [(8, 16)] * 3 + [(2, 64)] * 4
    json.dumps(states[-1])  # the state goes into the checkpoint's objects.json
    for at in (2, 3, 5):
        resumed = make()
        resumed.load_state_dict(states[at])
        for expected in full[at:]:
            got = next(resumed)
            assert torch.equal(got.input_ids, expected.input_ids), at
            assert torch.equal(got.doc_ids, expected.doc_ids), at
        resumed.close()


def test_loader_refuses_a_state_with_other_lanes(text_data):
    state = TokenLoader(text_data["train"], 16, 8, seq_len_stages=[(0, 16, 8), (3, 64, 2)]
                        ).state_dict()
    other = TokenLoader(text_data["train"], 16, 4, seq_len_stages=[(0, 16, 4), (3, 64, 1)])
    with pytest.raises(UserValueError, match="saved with micro_batch_size=8"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------- rope

def test_rope_tables_cover_the_long_stage_with_scaling_and_short_ones_plain():
    scaling = RopeScalingConfig(type="yarn", factor=2.0, original_max_seq_len=32)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      ffn_hidden=32, max_seq_len=64, rope_scaling=scaling, moe=None)
    model = Decoder(cfg)
    scaled = rope_cos_sin(64, cfg.head_dim, cfg.rope_theta, scaling)
    plain = rope_cos_sin(64, cfg.head_dim, cfg.rope_theta, None)
    assert not torch.equal(scaled[0], plain[0])  # the scaling changes the table
    # Unscheduled: scaled at every length (as transformers applies it).
    assert torch.equal(model._rope_tables(16)[0], scaled[0][:16])
    model.scale_rope_beyond_original()
    for T, (cos, sin) in ((16, plain), (32, plain), (33, scaled), (64, scaled)):
        got_cos, got_sin = model._rope_tables(T)
        assert got_cos.shape == (T, cfg.head_dim)
        assert torch.equal(got_cos, cos[:T]) and torch.equal(got_sin, sin[:T]), T


# ----------------------------------------------------------------------------- training

def _weights(cfg) -> dict[str, torch.Tensor]:
    return Trainer(cfg, resume=True).model.state_dict()


def test_resume_across_the_switch_is_bit_exact(text_data, tmp_path):
    """Uninterrupted vs stopped before the switch (step 2) and after it (step 4), resumed:
    equal losses and weights, bit for bit (fp32, grad_accum=2, switch at step 3)."""
    extra = {"train.grad_accum": 2}
    full_cfg = _cfg(text_data, tmp_path / "full", **extra)
    trainer = Trainer(full_cfg)
    assert trainer.model.plain_rope_up_to == 32  # 16-token stage: plain RoPE; 64: YaRN
    full = trainer.fit()
    records = [json.loads(line) for line in
               (tmp_path / "full" / "t" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["train/seq_len"] for r in train] == [16.0] * 3 + [64.0] * 3
    assert [r["tokens"] for r in train] == [s * 2 * 8 * 16 for s in range(1, 7)]
    assert train[3]["flops"] - train[2]["flops"] > train[2]["flops"] - train[1]["flops"]
    val_keys = [sorted(k for k in r if k.startswith("val/loss_pos")) for r in records
                if "val/loss" in r]
    assert val_keys[0][0] == "val/loss_pos_0-4" and val_keys[1][0] == "val/loss_pos_0-16"
    full_weights = _weights(full_cfg)
    for stop in (2, 4):
        cfg = _cfg(text_data, tmp_path / f"stop{stop}", **extra)
        assert Trainer(cfg).fit(stop_after=stop).final_step == stop
        resumed = Trainer(cfg, resume=True).fit()
        for step in range(stop + 1, 7):
            assert resumed.train_losses[step] == full.train_losses[step], (stop, step)
        for name, value in _weights(cfg).items():
            torch.testing.assert_close(value, full_weights[name], rtol=0, atol=0)


def _dp2_resume(overrides: list[str], root: str) -> dict:
    """On each of 2 ranks: uninterrupted 6 steps, and 2 steps then a resume to 6."""
    import torch.distributed as dist

    def cfg(name):
        return load_config(ROOT / "configs" / "text_moe_tiny.yaml",
                           [*overrides, f"run.out_dir={root}", f"run.name={name}"])

    full = Trainer(cfg("full")).fit()
    Trainer(cfg("split")).fit(stop_after=2)
    resumed = Trainer(cfg("split"), resume=True).fit()
    a, b = _weights(cfg("full")), _weights(cfg("split"))
    return {"rank": dist.get_rank(), "full": full.train_losses, "resumed": resumed.train_losses,
            "same_weights": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}


@pytest.mark.distributed
def test_two_data_parallel_ranks_resume_across_the_switch(text_data, tmp_path):
    from mmfm.parallel.local import spawn

    overrides = tiny_overrides(text_data, tmp_path, **{
        "data.seq_len": 16, "train.micro_batch_size": 8, "train.seq_len_schedule": SWITCH,
        "model.rope_scaling": YARN, "train.eval_every": 6, "train.ckpt_every": 2,
        "parallel.engine": "ddp"})
    results = spawn(_dp2_resume, 2, (overrides, str(tmp_path)), timeout_s=240)
    for r in results:
        assert r["same_weights"], r["rank"]
        for step in range(3, 7):
            assert r["resumed"][step] == r["full"][step], (r["rank"], step)


def test_long_context_preset_runs_through_mmfm_train(text_data, tmp_path):
    """configs/text_moe_tiny_longctx.yaml as written resolves to 8×256 then 2×1024; `mmfm
    train` on it (model narrowed, switch moved to step 2 of 3) crosses the switch."""
    from mmfm.cli import main

    preset = ROOT / "configs" / "text_moe_tiny_longctx.yaml"
    stages = SeqLenSchedule.from_config(load_config(preset)).stages
    assert [(s.start_step, s.seq_len, s.rows) for s in stages] == [(0, 256, 8), (200, 1024, 2)]
    overrides = {
        "run.out_dir": str(tmp_path), "run.name": "long", "model.vocab_size": 512,
        "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
        "model.ffn_hidden": 32, "model.moe.expert_hidden": 32,
        "data.train_shards": str(text_data["train"]), "data.val_shards": str(text_data["val"]),
        "data.tokenizer": str(text_data["tokenizer"]), "train.steps": 3, "train.warmup_steps": 1,
        "train.seq_len_schedule": "[{step: 2, seq_len: 1024}]", "train.eval_every": 3,
        "train.eval_batches": 1, "train.ckpt_every": 3, "train.log_every": 1,
        "train.precision": "fp32", "metrics.console": False}
    assert main(["train", str(preset), *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    records = [json.loads(line) for line in
               (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/seq_len"] for r in records if "train/loss" in r] == [256.0, 256.0, 1024.0]
    assert any("val/loss_pos_768-1024" in r for r in records)
