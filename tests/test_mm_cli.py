"""`mmfm data shards --multimodal RECIPE.yaml`: shard sets from real media and text, a
manifest that names unavailable sources, recipe errors that name the field."""

from __future__ import annotations

import json

import pytest
import yaml
from test_mm_common import MEDIA_CACHE

from mmfm.cli import main
from mmfm.data.mm_build import load_recipe
from mmfm.data.mm_shards import read_mm_index


def _recipe(tmp_path, sets: dict, **extra) -> str:
    body = {"out": str(tmp_path / "out"), "cache": str(MEDIA_CACHE), "seed": 1,
            "val_fraction": 0.2, "max_samples_per_shard": 4, "sets": sets, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def test_cli_writes_shard_sets_and_manifest(tmp_path, capsys):
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of a real file", "source": "t"}) + "\n"
                              for i in range(5)))
    recipe = _recipe(tmp_path, {
        "photos": {"media": ["skimage", "sklearn", "matplotlib"], "items_per_doc": [1, 2]},
        "text": {"jsonl": str(corpus)}})
    assert main(["data", "shards", "--multimodal", recipe]) == 0
    out = tmp_path / "out"
    train = read_mm_index(out / "photos" / "train")
    val = read_mm_index(out / "photos" / "val")
    assert train["num_samples"] + val["num_samples"] >= 14 and val["num_samples"] >= 1
    assert set(train["sources"]) <= {"skimage", "sklearn", "matplotlib"}
    assert read_mm_index(out / "text" / "train")["num_samples"] >= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["media_sources"]["skimage"]["items"] >= 20
    assert "multimodal shard sets written" in capsys.readouterr().out


def test_recipe_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="recipe.sets.a.media: unknown sources"):
        load_recipe(_recipe(tmp_path, {"a": {"media": ["youtube"]}}))
    with pytest.raises(ValueError, match=r"recipe.sets.a.items_per_doc=\[3, 1\]"):
        load_recipe(_recipe(tmp_path, {"a": {"media": ["skimage"], "items_per_doc": [3, 1]}}))
    with pytest.raises(ValueError, match="bogus"):
        load_recipe(_recipe(tmp_path, {"a": {"media": ["skimage"]}}, bogus=1))
    assert main(["data", "shards", "--multimodal", str(tmp_path / "missing.yaml")]) == 2


def test_demo_recipe_loads():
    from conftest import ROOT

    recipe = load_recipe(ROOT / "configs" / "data" / "mm_demo.yaml")
    assert set(recipe.sets) == {"images", "speech", "spoken_stamps"}
