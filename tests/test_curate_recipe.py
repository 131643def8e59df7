"""Recipes: the shipped ones load; every user error is one line naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfm.data.curation.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "t", "output": "out",
    "sources": [{"name": "lic", "path": "/usr/share/common-licenses", "kind": "boilerplate"}],
    "chains": {"prose": ["normalize", {"gopher_quality": {"min_doc_words": 10}}, "pii"]},
}


def _write(tmp: Path, data: dict) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _with(**changes) -> dict:
    d = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = d
        *parents, last = dotted.split("__")
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    return d


@pytest.mark.parametrize("name", ["demo.yaml", "large_scale.yaml"])
def test_shipped_recipes_load(name):
    # the large-scale recipe names a cluster's paths, absent here
    r = load_recipe(ROOT / "configs" / "data" / name, check_paths=name == "demo.yaml")
    kinds = {s.kind for s in r.sources}
    assert len(kinds) >= 4
    assert r.dedup.bands * r.dedup.rows == 112 and r.dedup.ngram == 5
    assert all(r.chain_for(s) in r.chains for s in r.sources)


def test_good_recipe_and_overrides(tmp_path):
    r = load_recipe(_write(tmp_path, BASE), ["executor.workers=3", "dedup.bands=20"])
    assert r.executor.workers == 3 and r.num_tasks() == 6 and r.dedup.bands == 20
    assert r.chain_for(r.sources[0]) == "prose"
    assert Path(r.base_dir) == tmp_path.resolve()


@pytest.mark.parametrize("changes, message", [
    ({"chains": {"prose": ["normalize", "gopher_qualty"]}},
     r"recipe.yaml: chains.prose\[1\]: unknown stage 'gopher_qualty'; known: c4, code"),
    ({"chains": {"prose": [{"c4": {"min_sentences": 3}}]}},
     r"chains.prose\[0\].c4: unknown parameter\(s\) \['min_sentences'\]"),
    ({"sources__0__path": "/no/such/dir"}, r"sources\[0\].path: does not exist: /no/such/dir"),
    ({"sources__0__kind": "blog"}, r"sources\[0\].kind: unknown kind 'blog'"),
    ({"sources__0__format": "pdf"}, r"sources\[0\].format: unknown format 'pdf'"),
    ({"sources__0__chain": "web"}, r"sources\[0\].chain: no chain named 'web'"),
    ({"sources__0__target_share": 0.5}, r"sources: target_share values sum to 0.5000, not 1"),
    ({"sources__0__lang_threshold": "high"}, r"recipe.yaml: sources\[0\].lang_threshold: "),
    ({"sources__0__colour": "red"}, r"recipe.yaml: sources\[0\].colour: Key 'colour' not in"),
    ({"dedup": {"rows": 0}}, r"dedup.rows: 0 must be > 0"),
    ({"dedup": {"priority": ["nope"]}}, r"dedup.priority\[0\]: 'nope' is not a source name"),
    ({"executor": {"kind": "spark"}}, r"executor.kind: unknown executor 'spark'"),
])
def test_recipe_errors_name_file_and_field(tmp_path, changes, message):
    data = _with(**changes)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(_write(tmp_path, data))
    assert "\n" not in str(info.value)


def test_unreadable_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file .*none.yaml does not exist"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_recipe(bad)
    dup = _with()
    dup["sources"].append(dict(dup["sources"][0]))
    with pytest.raises(RecipeError, match=r"sources\[1\].name: duplicate source name 'lic'"):
        load_recipe(_write(tmp_path, dup))
