"""`mmfm data curate` end to end on a small real corpus (licence texts, Debian copyright
files with known duplicates, stdlib code, HTML docs, a JSONL file with bad lines): outputs,
report, restart without redoing finished work, process pool == one process, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import yaml

from mmfm.cli import main
from mmfm.data.curation.pipeline import curate
from mmfm.data.curation.recipe import load_recipe

DOC = Path("/usr/share/doc")
LICENSES = Path("/usr/share/common-licenses")
STDLIB_JSON = Path(sysconfig.get_paths()["stdlib"]) / "json"
FONTCONFIG = ["fontconfig", "fontconfig-config", "libfontconfig1"]  # identical copyright files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if not LICENSES.is_dir() or not all((DOC / p / "copyright").is_file() for p in FONTCONFIG):
        pytest.skip("needs /usr/share/common-licenses and fontconfig's copyright files")
    root = tmp_path_factory.mktemp("curate_src")
    pkgs = sorted(p.parent.name for p in DOC.glob("*/copyright")
                  if p.is_file() and not p.is_symlink() and p.stat().st_size < 40_000)[:30]
    for pkg in sorted(set(pkgs) | set(FONTCONFIG)):
        (root / "copyright" / pkg).mkdir(parents=True)
        shutil.copy(DOC / pkg / "copyright", root / "copyright" / pkg / "copyright")
    html = [p for p in DOC.glob("*/*.html") if p.is_file()][:4]
    (root / "html").mkdir()
    for i, p in enumerate(html):
        shutil.copy(p, root / "html" / f"{i}.html")
    paragraphs = [p for f in sorted(LICENSES.iterdir())[:4]
                  for p in f.read_text().split("\n\n") if len(p.split()) > 25][:40]
    lines = [json.dumps({"text": p, "id": f"para{i}"}) for i, p in enumerate(paragraphs)]
    lines[3:3] = ["{broken json", json.dumps({"body": "no text field"})]
    (root / "paragraphs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _recipe_dict(src: Path, out: Path, **extra) -> dict:
    prose = ["normalize", "language",
             {"gopher_quality": {"min_doc_words": 20, "max_non_alpha_words_ratio": 0.5,
                                 "max_symbol_word_ratio": 0.3}}, "pii"]
    d = {
        "name": "small", "output": str(out),
        "sources": [
            {"name": "licenses", "path": str(LICENSES), "format": "text", "extensions": [""],
             "kind": "boilerplate", "languages": ["en"], "target_share": 0.3},
            {"name": "copyright", "path": str(src / "copyright"), "format": "text",
             "extensions": ["copyright"], "kind": "boilerplate", "languages": ["en"],
             "target_share": 0.2},
            {"name": "paragraphs", "path": str(src / "paragraphs.jsonl"), "format": "jsonl",
             "kind": "other", "languages": ["en"], "target_share": 0.2},
            {"name": "stdlib_json", "path": str(STDLIB_JSON), "format": "code",
             "extensions": [".py"], "kind": "code", "target_share": 0.2},
            {"name": "html", "path": str(src / "html"), "format": "html", "kind": "docs",
             "chain": "html", "target_share": 0.1, "optional": True},
        ],
        "chains": {"prose": prose, "code": ["normalize", "code", "pii"],
                   "html": ["html_to_text", "normalize", "pii"]},
        "dedup": {"priority": ["licenses", "paragraphs"]},
        "tokenizer": {"vocab_size": 400, "sample_chars": 300_000},
        "executor": {"workers": 1, "tasks": 2},
        "mixture": {"holdout_fraction": 0.05},
    }
    d.update(extra)
    return d


def _write_recipe(tmp: Path, d: dict) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curate_run")
    recipe = load_recipe(_write_recipe(tmp, _recipe_dict(corpus, tmp / "out")))
    report = curate(recipe, cache_dir=tmp / "cache")
    return recipe, report, tmp / "out"


def test_outputs_manifest_and_report(run):
    recipe, report, out = run
    for name in ("train.jsonl", "val.jsonl", "manifest.json", "tokenizer.json", "report.json",
                 "report.md", "report.html"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "mmfm-corpus"
    by = {s["name"]: s for s in manifest["sources"]}
    assert set(by) == {"licenses", "copyright", "paragraphs", "stdlib_json", "html"}
    # bad JSONL lines are counted for their source
    assert by["paragraphs"]["read_stats"]["skipped_bad_lines"] == 2
    # mixture: epochs per source recorded, realized shares near the targets
    for s in manifest["sources"]:
        m = s["mixture"]
        assert m["epochs"] > 0 and "realized_share" in m
        if not m["capped"]:
            assert abs(m["realized_share"] - m["target_share"]) < 0.1, s["name"]
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert sum(s["docs"]["train"] for s in manifest["sources"]) == len(train)
    assert all("[EMAIL]" not in d["text"] or "@" not in d["text"].split("[EMAIL]")[0][-3:]
               for d in train)
    # report: per source x stage counts, examples, dedup clusters, tokenizer bytes/token
    src = report["sources"]["copyright"]
    assert list(src["stages"]) == ["normalize", "language", "gopher_quality", "pii"]
    st = src["stages"]["pii"]
    assert st["docs_in"] >= st["docs_out"] > 0 and st["modified"] > 0  # emails scrubbed
    assert src["dedup"]["exact_duplicate"] >= 2  # the fontconfig trio
    assert report["dedup"]["exact_cluster_sizes"].get("3", 0) >= 1
    tok = report["tokenizer"]
    assert tok["vocab_size"] <= 400 and all(v["bytes_per_token"] > 1
                                            for v in tok["per_source"].values() if v["tokens"])
    md = (out / "report.md").read_text()
    assert "## Removed examples per filter" in md and "exact clusters by size" in md
    assert "<table>" in (out / "report.html").read_text()


def test_keep_rule_prefers_the_listed_source(run):
    recipe, report, out = run
    removed = json.loads((out / ".work" / "dedup.json").read_text())["removed"]
    # across sources: a licence text quoted whole in a copyright file is kept as the licence
    cross = [(kept, own) for _, _, _, kept, own in removed
             if kept.split("/")[0] != own.split("/")[0]]
    assert cross and all(k.startswith("licenses/") for k, _ in cross)
    # inside one source (same words): the smallest id is kept
    fc = [(kept, own) for _, _, reason, kept, own in removed if "fontconfig" in own]
    assert fc and all(k == "copyright/fontconfig-config/copyright" for k, _ in fc)
    assert {o for _, o in fc} == {"copyright/fontconfig/copyright",
                                  "copyright/libfontconfig1/copyright"}


def test_shards_from_the_curated_corpus(run, tmp_path):
    _, _, out = run
    assert main(["data", "shards", "--corpus", str(out), "--tokenizer", str(out / "tokenizer.json"),
                 "--out", str(tmp_path / "shards"), "--docs-per-shard", "50"]) == 0
    assert (tmp_path / "shards" / "train" / "index.json").is_file()


def test_restart_skips_finished_tasks(corpus, tmp_path):
    out = tmp_path / "out"
    path = _write_recipe(tmp_path, _recipe_dict(corpus, out))
    curate(load_recipe(path), cache_dir=tmp_path / "cache")
    work = out / ".work" / "process"
    t0 = (work / "00000.stats.json").stat().st_mtime_ns
    # a crash in task 1 and before dedup: its marker and everything after it are missing
    (work / "00001.stats.json").unlink()
    (out / ".work" / "dedup.json").unlink()
    shutil.rmtree(out / "curated")
    (out / "report.json").unlink()
    again = curate(load_recipe(path), cache_dir=tmp_path / "cache")
    assert (work / "00000.stats.json").stat().st_mtime_ns == t0  # not redone
    assert (work / "00001.stats.json").is_file()
    assert "resumed" not in again
    third = curate(load_recipe(path), cache_dir=tmp_path / "cache")
    assert third["resumed"] == "complete"
    # a changed recipe invalidates the work directory
    changed = _recipe_dict(corpus, out, dedup={"bands": 16, "rows": 7})
    report = curate(load_recipe(_write_recipe(tmp_path, changed)), cache_dir=tmp_path / "cache")
    assert "resumed" not in report and (work / "00000.stats.json").stat().st_mtime_ns != t0


def test_process_pool_matches_one_process(corpus, run, tmp_path):
    _, _, out1 = run
    d = _recipe_dict(corpus, tmp_path / "out", executor={"workers": 2, "tasks": 2})
    curate(load_recipe(_write_recipe(tmp_path, d)), cache_dir=tmp_path / "cache")
    for f in sorted((out1 / "curated").glob("*.jsonl")):
        assert (tmp_path / "out" / "curated" / f.name).read_text() == f.read_text(), f.name
    assert (tmp_path / "out" / "train.jsonl").read_text() == (out1 / "train.jsonl").read_text()


def test_cli_curate_and_one_line_errors(corpus, tmp_path, capsys):
    d = _recipe_dict(corpus, tmp_path / "out")
    d["sources"] = d["sources"][2:3]
    d["sources"][0]["target_share"] = 1.0
    d["dedup"] = {}
    path = _write_recipe(tmp_path, d)
    assert main(["data", "curate", str(path)]) == 0
    assert "curated corpus in" in capsys.readouterr().out
    bad = dict(d, chains={**d["chains"], "prose": ["normalize", "bad_words"]})
    assert main(["data", "curate", str(_write_recipe(tmp_path, bad))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "chains.prose[1]: unknown stage 'bad_words'" in err
    strict = dict(d, strict=True, output=str(tmp_path / "strict"))
    assert main(["data", "curate", str(_write_recipe(tmp_path, strict))]) == 2
    err = capsys.readouterr().err.strip()
    assert "paragraphs.jsonl:4: malformed JSON" in err
    os.environ.pop("MMFM_DEBUG", None)
