"""Curation stages on crafted edge inputs (thresholds at their published defaults) and on
real text from this machine."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from mmfm.data.curation.filters import (
    STAGES,
    C4Quality,
    CodeQuality,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    HtmlToText,
    LanguageFilter,
    Normalize,
    PIIScrubber,
    ProfanityFilter,
    build_chain,
    identify_language,
    normalize_text,
    scrub_pii,
    validate_chain,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
LICENSES = Path("/usr/share/common-licenses")
# A real English paragraph (the start of the Apache-2.0 licence's section 7) repeated into
# sentences of ordinary prose; every quality filter keeps it.
PROSE = ("Unless required by applicable law or agreed to in writing, the Licensor provides "
         "the Work on an as is basis, without warranties or conditions of any kind. You are "
         "solely responsible for determining the appropriateness of using or redistributing "
         "the Work and assume any risks associated with your exercise of permissions under "
         "this License. In no event and under no legal theory shall any contributor be liable "
         "to you for damages, including any direct or indirect damages of any character. "
         "This applies even if such contributor has been advised of the possibility of such "
         "damages.")


def doc(text: str, **meta) -> dict:
    return {"text": text, "id": "t", "source": "test", **meta}


def test_normalize_nfc_controls_whitespace():
    text = "Cafe\u0301\r\nline\x07 two\u00a0here   \n\n\n\n\u200bzero\u200dwidth\ufeff\t tab"
    out = normalize_text(text)
    assert out == "Café\nline two here\n\nzero\u200dwidth\t tab"
    assert normalize_text("a    b", collapse_spaces=True) == "a b"
    code = "def f():\n    return 1   \n"
    assert normalize_text(code) == "def f():\n    return 1"  # indentation kept
    d = doc("\x00\x01  \n\n")
    assert Normalize()(d) == "empty_after_normalize"


def test_html_to_text_drops_markup_scripts_and_navigation():
    page = ("<html><head><title>t</title><script>var x = 1;</script><style>p{}</style></head>"
            "<body><nav><a href='/'>Home</a></nav><main><h1>Heading</h1><p>" + PROSE +
            "</p></main></body></html>")
    for extractor in ("resiliparse", "trafilatura"):
        d = doc(page)
        assert HtmlToText(extractor=extractor)(d) is None
        assert "Licensor provides the Work" in d["text"]
        assert "<p>" not in d["text"] and "var x" not in d["text"]
    assert HtmlToText()(doc("<html><body><script>1</script></body></html>")) == \
        "html_no_main_text"


def test_html_to_text_on_real_debian_documentation():
    pages = [p for p in Path("/usr/share/doc").glob("*/*.html") if p.is_file()][:5]
    if not pages:
        pytest.skip("no HTML pages under /usr/share/doc on this machine")
    for p in pages:
        d = doc(p.read_text(encoding="utf-8", errors="replace"))
        if HtmlToText()(d) is None:
            assert "<" not in d["text"][:200] or "</" not in d["text"]


def test_gopher_quality_published_thresholds():
    f = GopherQuality()
    assert f(doc(PROSE)) is None
    words = PROSE.split()
    assert f(doc(" ".join(words[:40]))) == "gopher_quality:gopher_short_doc"  # < 50 words
    assert f(doc(PROSE + " #" * 20)).startswith("gopher_quality:")  # symbol/word > 0.1
    no_stop = " ".join(["licensor", "provides", "work", "basis", "warranties"] * 20) + "."
    assert f(doc(no_stop)) == "gopher_quality:gopher_enough_stop_words"
    bullets = "\n".join("- " + " ".join(words[i:i + 10]) for i in range(0, 100, 10))
    assert f(doc(bullets)) == "gopher_quality:gopher_too_many_bullets"
    assert GopherQuality(min_doc_words=20)(doc(" ".join(words[:40]) + ".")) is None


def test_gopher_repetition_catches_repeated_lines_and_ngrams():
    f = GopherRepetition()
    assert f(doc(PROSE)) is None
    lines = "\n".join(["Buy cheap watches now and save big today"] * 10 + [PROSE])
    assert f(doc(lines)).startswith("gopher_repetition:dup_line")
    grams = " ".join(["the same four words"] * 40)
    assert f(doc(grams)).startswith("gopher_repetition:")


def test_c4_drops_bad_lines_and_documents():
    f = C4Quality()
    sentences = PROSE + " " + PROSE
    d = doc(sentences + "\nPlease enable JavaScript to view this page.\nshort line")
    assert f(d) is None
    assert "javascript" not in d["text"].lower() and "short line" not in d["text"]
    assert f(doc(sentences + "\nLorem ipsum dolor sit amet, consectetur elit.")) == "c4:lorem_ipsum"
    assert f(doc(sentences + "\nfunction f() { return 1; }.")) == "c4:curly_bracket"
    assert f(doc("One sentence only here.")) == "c4:too_few_sentences"


def test_fineweb_line_shape_rules():
    f = FineWebQuality()
    assert f(doc(PROSE)) is None
    menu = "\n".join(["Home", "About us", "Products", "Contact", "Login"] * 4 + [PROSE])
    assert f(doc(menu)) == "fineweb:line_punct_ratio"
    no_punct = "\n".join(["this line has no full stop at its end"] * 2 + ["x."] * 8)
    assert f(doc(no_punct)) in ("fineweb:short_line_ratio", "fineweb:line_punct_ratio",
                                "fineweb:char_dup_ratio")


def test_code_filters_on_real_stdlib_and_edge_cases():
    f = CodeQuality()
    real = (STDLIB / "json" / "encoder.py").read_text()
    assert f(doc(real)) is None
    assert f(doc("x = 1\n" + "y = '" + "a" * 1001 + "'\n")) == "code:max_line_length"
    assert f(doc("# Auto-generated by protoc, DO NOT EDIT\nx = 1\n")) == "code:autogenerated"
    assert f(doc("x = [\n" + "    0x00, 0x01,\n" * 3 + "]\n" + "#" * 10 + "\n" + "{}" * 40)) == \
        "code:alnum_fraction"
    assert f(doc("a = '" + "b" * 300 + "'\n" * 2)) == "code:mean_line_length"
    generated = (STDLIB / "encodings" / "cp1252.py").read_text()  # "generated from ..."
    assert f(doc(generated)) == "code:autogenerated"


def test_language_id_offline_with_source_languages_and_threshold():
    lang, prob = identify_language(PROSE)
    assert lang == "en" and prob > 0.9
    german = ("Die Lizenz gewährt Ihnen das Recht, das Werk zu vervielfältigen und zu "
              "verbreiten, sofern Sie die folgenden Bedingungen einhalten.")
    f = LanguageFilter(languages=["en"], threshold=0.5)
    d = doc(PROSE)
    assert f(d) is None and d["lang"] == "en"
    assert f(doc(german)) == "language:not_en"
    assert LanguageFilter(languages=["en", "de"])(doc(german)) is None
    assert LanguageFilter(languages=None)(doc(german)) is None  # recorded, not filtered
    assert LanguageFilter(languages=["en"], threshold=1.01)(doc(PROSE)) == \
        "language:below_threshold"


def test_profanity_uses_the_bundled_list_with_a_ratio():
    f = ProfanityFilter()
    assert f(doc(PROSE)) is None
    rude = "you are a fucking idiot and a shit bastard asshole " * 3
    assert f(doc(rude)) == "profanity:ratio"
    one_word = PROSE + " damn"  # one listed word in 100: under the ratio and the count
    assert f(doc(one_word)) is None


def test_pii_scrubbing_placeholders_and_near_misses():
    text = ("Mail jane.doe+list@example.co.uk or ops@host.example.org. Server 192.168.10.254 "
            "and 2001:db8::8a2e:370:7334 answer; call (555) 123-4567, +44 20 7946 0958 or "
            "555-867-5309. Version 1.2.3, pi 3.14, slice a[1:2:3], time 12:30:45, "
            "isbn 978-3-16-148410-0, not an ip 999.1.1.1.")
    out, counts = scrub_pii(text)
    assert counts == {"email": 2, "ip": 2, "phone": 3}
    for kept in ("Version 1.2.3", "3.14", "a[1:2:3]", "12:30:45", "999.1.1.1"):
        assert kept in out
    assert "[EMAIL]" in out and "[IP_ADDRESS]" in out and "[PHONE]" in out
    d = doc(text)
    assert PIIScrubber(kinds=["email"])(d) is None
    assert "[EMAIL]" in d["text"] and "192.168.10.254" in d["text"]


def test_chain_validation_names_the_entry():
    errors = []

    def fail(path, why):
        errors.append(f"{path}: {why}")
        raise ValueError(errors[-1])

    with pytest.raises(ValueError, match=r"chains.x\[1\]: unknown stage 'gopher_qualty'"):
        validate_chain(["normalize", "gopher_qualty"], "chains.x", fail)
    with pytest.raises(ValueError, match=r"chains.x\[0\].c4: unknown parameter\(s\) \['bogus'\]"):
        validate_chain([{"c4": {"bogus": 1}}], "chains.x", fail)
    chain = build_chain(["normalize", {"language": {}}, {"gopher_quality": {"min_doc_words": 5}}],
                        languages=["de"], lang_threshold=0.7)
    assert [s.name for s in chain] == ["normalize", "language", "gopher_quality"]
    assert chain[1].languages == {"de"} and chain[1].threshold == 0.7
    assert set(STAGES) >= {"gopher_quality", "gopher_repetition", "c4", "fineweb", "code",
                           "language", "profanity", "pii", "normalize", "html_to_text"}
