"""Routing capture on the multimodal model: placeholder tokens carry their modality, shared
routing is captured, and modality expert groups (MoMa) are refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
from test_mm_common import mm_shards, photo_items, speech_items  # noqa: F401 (fixtures)
from test_mm_train import mm_config

from mmfm.errors import MmfmError
from mmfm.report import analysis as A
from mmfm.report.capture import capture_records
from mmfm.train.task import build_task


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
    spec = A.specialization(records, records.modality_N.astype(np.int16), ["text", "image", "audio"])
    assert "image" in spec["groups"] and 0.0 <= spec["score"][0] <= 1.0


def test_modality_expert_groups_are_refused(mm_shards, text_data, tmp_path):  # noqa: F811
    cfg = mm_config(mm_shards, text_data, tmp_path)  # moe_routing=modality
    task = build_task(cfg)
    model = task.build_model()
    batch = next(iter(task.eval_batches()))
    with pytest.raises(MmfmError, match="not supported for modality expert groups"):
        capture_records(model, [(batch, None)], step=0)
