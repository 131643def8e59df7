"""The curation report page: Jinja2 HTML with four matplotlib figures embedded as base64
PNG, removed examples with the triggering words highlighted, and the page opened in
headless Chromium (tests/browser.py)."""

from __future__ import annotations

import base64
import json
import re

import pytest
from browser import check_page, skip_reason
from test_curate_pipeline import _recipe_dict, _write_recipe, corpus  # noqa: F401

from mmfm.data.curation.pipeline import curate
from mmfm.data.curation.recipe import load_recipe
from mmfm.data.curation.report_html import funnel_rows, highlight

RUDE = ("This thread is full of shit. You fucking idiot, what a bastard and an asshole you "
        "are, said the user, and the shit went on and on for days in the comments here.")


@pytest.fixture(scope="module")
def report_run(corpus, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("curate_report")
    rude = [{"id": f"rude{i}", "text": RUDE} for i in range(3)]
    rude[1]["text"] = "A long calm introduction about gardens and weather. " * 12 + RUDE
    (tmp / "forum.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rude))
    d = _recipe_dict(corpus, tmp / "out")
    d["sources"].append({"name": "forum", "path": str(tmp / "forum.jsonl"), "format": "jsonl",
                         "kind": "web", "chain": "forum", "target_share": 0.1})
    d["sources"][2]["target_share"] = 0.1
    d["chains"]["forum"] = ["normalize", "profanity"]
    d["report"] = {"example_chars": 200}
    report = curate(load_recipe(_write_recipe(tmp, d)), cache_dir=tmp / "cache")
    return report, tmp / "out"


def test_report_page_has_figures_and_highlighted_triggers(report_run):
    report, out = report_run
    page = (out / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 4
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "<pre>" not in page  # no raw Markdown blocks any more
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing to fetch
    forum = report["sources"]["forum"]
    assert forum["removed_by_reason"] == {"profanity:ratio": 3}
    assert forum["fired_words"]["profanity:ratio"]["shit"] == 6
    marked = re.findall(r"<mark>([^<]+)</mark>", page)
    assert {"shit", "fucking", "bastard", "asshole"} <= set(marked)
    # the long example is cut around its first trigger, which stays highlighted
    long_ex = next(e for e in forum["removed_examples"]["profanity:ratio"] if e["id"] == "rude1")
    assert long_ex["offset"] > 0 and long_ex["text"][slice(*long_ex["spans"][0])] == "shit"
    for name, rows in funnel_rows(report).items():  # the funnel accounts for every document
        assert sum(n for _, n in rows) == report["sources"][name]["read"]["docs"], name


def test_report_has_length_histograms_before_and_after(report_run):
    report, _ = report_run
    lengths = report["sources"]["copyright"]["length_hist"]
    assert set(lengths) == {"read", "filtered", "curated"}
    read, curated = (sum(lengths[k].values()) for k in ("read", "curated"))
    assert read == report["sources"]["copyright"]["read"]["docs"]
    assert curated == report["sources"]["copyright"]["dedup"]["docs_out"] < read


def test_highlight_cuts_at_spans():
    assert highlight("a bad word here", [[2, 5], [6, 10]]) == [
        ("a ", False), ("bad", True), (" ", False), ("word", True), (" here", False)]
    assert highlight("abc", []) == [("abc", False)]
    assert highlight("abcdef", [[1, 4], [2, 5]]) == [("a", False), ("bcd", True),
                                                     ("e", True), ("f", False)]


def test_report_renders_in_chromium(report_run, tmp_path):
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    _, out = report_run
    seen = check_page(out / "report.html", tmp_path / "curation_report.png")
    assert seen.title == "Curation report small"
    assert len(seen.images) == 4 and all(w > 300 and h > 200 for _, w, h in seen.images)
    assert "Removal funnel per source" in seen.text and "Words that fired" in seen.text
    assert (tmp_path / "curation_report.png").stat().st_size > 10_000
