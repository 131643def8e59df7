"""Curation stages: each is a small callable over one document.

A stage is called as ``stage(doc) -> None | str``: ``None`` keeps the document (the stage
may have rewritten ``doc["text"]``, e.g. normalization, C4 line removal, PII scrubbing), a
string removes it and is the reason recorded in the report (``"gopher_short_doc"``).
Stages are plain objects, so a chain runs the same way in one process, in a process pool
or on a cluster executor (see :mod:`mmfm.data.curation.pipeline`).

Where they are built from:

===================  =========================================================  ==========
stage                implementation                                             offline
===================  =========================================================  ==========
normalize            here (unicodedata NFC, control/format chars, whitespace)   yes
html_to_text         resiliparse (default, ~30x faster here) or trafilatura     yes
gopher_quality       datatrove ``GopherQualityFilter`` (published defaults)     yes
gopher_repetition    datatrove ``GopherRepetitionFilter``                       yes
c4                   datatrove ``C4QualityFilter`` (drops lines, then filters)  yes
fineweb              datatrove ``FineWebQualityFilter``                         yes
code                 here (StarCoder-style: line lengths, alphanumeric share,    yes
                     auto-generated markers); datatrove has no code filter
language             here on ``py3langid`` (bundled model); datatrove's          yes
                     LanguageFilter downloads a fastText model at run time
profanity            here on ``better-profanity``'s bundled word list;          yes
                     datatrove's bad-words filter downloads its lists
pii                  here (emails, IPv4/IPv6 checked by ``ipaddress``, phone    yes
                     numbers); datatrove's PIIFormatter has no phone numbers
===================  =========================================================  ==========
"""

from __future__ import annotations

import bisect
import inspect
import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmfm.errors import UserValueError

Document = dict[str, Any]
Fail = Callable[[str, str], None]


class Stage:
    """Base class: `name` is the recipe's name for the stage; `edits` says it may rewrite."""

    name = "stage"
    edits = False

    def __call__(self, doc: Document) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------- normalize

_KEEP_FORMAT = {"\u200c", "\u200d"}  # ZWNJ/ZWJ carry meaning in Indic/Arabic/emoji text
_BLANK_RUN = re.compile(r"\n{3,}")
_TRAILING = re.compile(r"[ \t]+\n")
_SPACES = re.compile(r"[ \t]{2,}")


class Normalize(Stage):
    """Unicode NFC; drop control and format characters (keeping tab and newline, ZWJ/ZWNJ);
    unify line endings and exotic spaces; strip trailing spaces; at most one blank line in a
    row. `collapse_spaces` also squeezes runs of spaces inside lines (never for code, where
    indentation is meaning). Removes documents left empty."""

    name = "normalize"
    edits = True

    def __init__(self, form: str = "NFC", collapse_spaces: bool = False):
        if form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise UserValueError(f"unknown unicode form {form!r}")
        self.form = form
        self.collapse_spaces = collapse_spaces

    def __call__(self, doc: Document) -> str | None:
        doc["text"] = normalize_text(doc["text"], self.form, self.collapse_spaces)
        return None if doc["text"] else "empty_after_normalize"


def normalize_text(text: str, form: str = "NFC", collapse_spaces: bool = False) -> str:
    text = unicodedata.normalize(form, text.replace("\r\n", "\n").replace("\r", "\n"))
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(ch)
            continue
        cat = unicodedata.category(ch)
        if cat == "Cc" or (cat == "Cf" and ch not in _KEEP_FORMAT):
            continue
        out.append(" " if cat == "Zs" else ch)
    text = _TRAILING.sub("\n", "".join(out) + "\n")
    if collapse_spaces:
        text = _SPACES.sub(" ", text)
    return _BLANK_RUN.sub("\n\n", text).strip("\n").rstrip()


class HtmlToText(Stage):
    """Main-content extraction from HTML (navigation, footers and scripts dropped) by a real
    extractor: resiliparse (default: C++, keeps headings and paragraphs apart) or
    trafilatura (pure Python, ~30x slower on /usr/share/doc's pages)."""

    name = "html_to_text"
    edits = True

    def __init__(self, extractor: str = "resiliparse", min_chars: int = 1):
        if extractor not in ("trafilatura", "resiliparse"):
            raise UserValueError(f"unknown extractor {extractor!r}; expected trafilatura or "
                             "resiliparse")
        self.extractor = extractor
        self.min_chars = min_chars

    def __call__(self, doc: Document) -> str | None:
        text = html_to_text(doc["text"], self.extractor)
        if len(text.strip()) < self.min_chars:
            return "html_no_main_text"
        doc["text"] = text
        return None


def html_to_text(html: str, extractor: str = "resiliparse") -> str:
    if extractor == "resiliparse":
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(html, main_content=True, alt_texts=False, links=False)
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True,
                               favor_precision=True, deduplicate=False) or ""


# ----------------------------------------------------------------------------- datatrove

class DatatroveFilter(Stage):
    """One of datatrove's quality filters, with its published defaults unless overridden.

    datatrove's ``filter(doc)`` returns True, False or ``(False, reason)``; C4's also drops
    lines from the text (citations, javascript, policy lines), which we keep."""

    edits = True
    target = ""  # "module:Class" inside datatrove.pipeline.filters

    def __init__(self, **params: Any):
        from datatrove.data import Document as DtDocument

        self._doc_cls = DtDocument
        self.impl = _datatrove_class(self.target)(**params)

    def __call__(self, doc: Document) -> str | None:
        d = self._doc_cls(text=doc["text"], id=str(doc.get("id", "")))
        result = self.impl.filter(d)
        if result is True:
            if not d.text.strip():
                return f"{self.name}:empty_after_line_filter"
            doc["text"] = d.text
            return None
        reason = result[1] if isinstance(result, tuple) else "rejected"
        return f"{self.name}:{reason}"


def _datatrove_class(target: str) -> type:
    import importlib

    module, cls = target.split(":")
    return getattr(importlib.import_module(f"datatrove.pipeline.filters.{module}"), cls)


class GopherQuality(DatatroveFilter):
    """Gopher quality (Rae et al. 2021): 50-100,000 words, mean word length 3-10,
    symbol/word <= 0.1, bullet lines <= 0.9, ellipsis lines <= 0.3, >= 80% of words with a
    letter, >= 2 stop words."""

    name = "gopher_quality"
    edits = False
    target = "gopher_quality_filter:GopherQualityFilter"


class GopherRepetition(DatatroveFilter):
    """Gopher repetition: duplicate line/paragraph fractions (0.3) and their character
    shares (0.2), top 2/3/4-gram shares (0.20/0.18/0.16), duplicate 5..10-gram shares
    (0.15 .. 0.10)."""

    name = "gopher_repetition"
    edits = False
    target = "gopher_repetition_filter:GopherRepetitionFilter"


class C4Quality(DatatroveFilter):
    """C4 (Raffel et al. 2020): keep lines ending in terminal punctuation with >= 3 words,
    drop javascript/policy lines and citations; remove documents with < 5 sentences,
    lorem ipsum, curly braces or words over 1000 characters."""

    name = "c4"
    target = "c4_filters:C4QualityFilter"


class FineWebQuality(DatatroveFilter):
    """FineWeb: line punctuation ratio >= 0.12, short-line (<= 30 chars) ratio <= 0.67,
    duplicated-character ratio <= 0.01, newline/word <= 0.3."""

    name = "fineweb"
    edits = False
    target = "fineweb_quality_filter:FineWebQualityFilter"


# ----------------------------------------------------------------------------- code

AUTOGEN_MARKERS = ("auto-generated", "autogenerated", "automatically generated",
                   "generated by", "generated from", "do not edit", "don't edit")


class CodeQuality(Stage):
    """Source-code filters in the spirit of StarCoder/The Stack: longest line, mean line
    length, alphanumeric share, and auto-generated markers in the first lines. Prose filters
    (stop words, terminal punctuation) are meaningless on code, so code gets these instead."""

    name = "code"

    def __init__(self, max_line_length: int = 1000, max_mean_line_length: float = 100.0,
                 min_alnum_fraction: float = 0.25, autogen_lines: int = 5,
                 min_lines: int = 1, max_chars: int = 1_000_000):
        self.max_line_length = max_line_length
        self.max_mean_line_length = max_mean_line_length
        self.min_alnum_fraction = min_alnum_fraction
        self.autogen_lines = autogen_lines
        self.min_lines = min_lines
        self.max_chars = max_chars

    def __call__(self, doc: Document) -> str | None:
        text = doc["text"]
        lines = text.splitlines()
        if len(lines) < self.min_lines:
            return "code:too_few_lines"
        if len(text) > self.max_chars:
            return "code:too_large"
        if max(len(ln) for ln in lines) > self.max_line_length:
            return "code:max_line_length"
        if sum(len(ln) for ln in lines) / len(lines) > self.max_mean_line_length:
            return "code:mean_line_length"
        if sum(c.isalnum() for c in text) / len(text) < self.min_alnum_fraction:
            return "code:alnum_fraction"
        head = "\n".join(lines[: self.autogen_lines]).lower()
        if self.autogen_lines and any(m in head for m in AUTOGEN_MARKERS):
            return "code:autogenerated"
        return None


# ----------------------------------------------------------------------------- language

@lru_cache(maxsize=1)
def _lang_identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str, max_chars: int = 4000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid's bundled naive Bayes model (97
    languages, no download). Only the first `max_chars` characters are looked at."""
    lang, prob = _lang_identifier().classify(text[:max_chars])
    return str(lang), float(prob)


class LanguageFilter(Stage):
    """Keep documents whose identified language is in `languages` with probability >=
    `threshold`. Both default to the source's own ``languages``/``lang_threshold``; a source
    without ``languages`` passes everything (but its language is still recorded)."""

    name = "language"

    def __init__(self, languages: list[str] | None = None, threshold: float | None = None,
                 max_chars: int = 4000):
        self.languages = set(languages) if languages else None
        self.threshold = 0.5 if threshold is None else threshold
        self.max_chars = max_chars

    def __call__(self, doc: Document) -> str | None:
        lang, prob = identify_language(doc["text"], self.max_chars)
        doc["lang"], doc["lang_score"] = lang, round(prob, 4)
        if self.languages is None:
            return None
        if lang not in self.languages:
            return f"language:not_{'_'.join(sorted(self.languages))}"
        if prob < self.threshold:
            return "language:below_threshold"
        return None


# ----------------------------------------------------------------------------- safety

@lru_cache(maxsize=1)
def profanity_words() -> tuple[frozenset[str], tuple[str, ...]]:
    """better-profanity's bundled list: (single words, multi-word phrases), lower case."""
    import better_profanity

    path = Path(better_profanity.__file__).parent / "profanity_wordlist.txt"
    entries = [w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines()]
    entries = [w for w in entries if w]
    return (frozenset(w for w in entries if " " not in w),
            tuple(w for w in entries if " " in w))


_WORD = re.compile(r"[\w']+")

# Words that put a listed word in a medical, biological, legal or historical sense: the
# bundled list holds anatomical and sexual-health terms that encyclopedic text uses plainly
# ("sexual reproduction", "the ovary is an organ", "age of consent").
CONTEXT_WORDS = frozenset("""
    anatomy anatomical biology biological medical medicine clinical disease diseases
    infection infections health hygiene organ organs tissue tissues cell cells gland glands
    hormone hormones reproduction reproductive species mammal mammals animal animals plant
    plants flower flowers fruit fruits fertilization embryo pregnancy gonad gonads genital
    genitals uterus ovary ovum sperm testis chromosome chromosomes gene genes genetic
    physiology physiological puberty contraception contraceptive symptoms treatment therapy
    patients patient virus bacteria law laws legal legislation crime criminal court rights
    consent education research study studies psychology psychological sociology history
    historical century war genocide regime religion religious theology church scripture
    gender orientation identity behavior behaviour dimorphism male female males females
    abuse assault harassment violence minors offence offense prosecution statute
    jurisdiction transmitted syndrome cancer surgery surgical procedure disorder diagnosis
    urinary menstruation menstrual fertility hormonal physician physicians
""".split())


@dataclass
class ProfanityHits:
    """What the profanity stage saw: the listed words that counted (with character spans),
    those spared by the allow-list or the context rule, and the number of words."""

    n_words: int
    fired: list[tuple[str, int, int]] = field(default_factory=list)  # (word, start, end)
    spared: list[tuple[str, str]] = field(default_factory=list)  # (word, "allow"|"context")

    @property
    def count(self) -> int:
        return len(self.fired)


class ProfanityFilter(Stage):
    """Remove documents where more than `max_ratio` of words (and at least `min_count`)
    are on better-profanity's bundled list (~900 entries). A ratio, not a single hit:
    literature and licences legitimately contain the odd listed word.

    Tuning (docs/data.md, "Safety filter"): `allow` words never count; `allow_by_source`
    maps a source name to more such words; with `context_window` > 0 a listed word does
    not count when one of `context_words` (default :data:`CONTEXT_WORDS`, medical,
    biological, legal and historical terms) is within that many words of it. A removed
    document records which words fired and where (``doc["_evidence"]``) for the report."""

    name = "profanity"

    def __init__(self, max_ratio: float = 0.01, min_count: int = 3,
                 allow: list[str] | None = None,
                 allow_by_source: dict[str, list[str]] | None = None,
                 context_window: int = 0, context_words: list[str] | None = None):
        if context_window < 0:
            raise UserValueError(f"profanity.context_window: {context_window} must be >= 0")
        self.max_ratio = max_ratio
        self.min_count = min_count
        self.allow = frozenset(w.lower() for w in allow or ())
        self.allow_by_source = {k: frozenset(w.lower() for w in v)
                                for k, v in (allow_by_source or {}).items()}
        self.context_window = context_window
        self.context_words = frozenset(w.lower() for w in context_words) \
            if context_words is not None else CONTEXT_WORDS

    def __call__(self, doc: Document) -> str | None:
        allow = self.allow | self.allow_by_source.get(str(doc.get("source")), frozenset())
        hits = find_profanity(doc["text"], allow, self.context_window, self.context_words)
        doc["profanity"] = hits.count
        if hits.count >= self.min_count and hits.count > self.max_ratio * max(hits.n_words, 1):
            doc["_evidence"] = {"rule": f"more than {self.max_ratio:g} of {hits.n_words} "
                                        f"words listed (min {self.min_count})",
                                "words": dict(Counter(w for w, _, _ in hits.fired)),
                                "spans": [[a, b] for _, a, b in hits.fired]}
            return "profanity:ratio"
        return None


def find_profanity(text: str, allow: frozenset[str] = frozenset(), context_window: int = 0,
                   context_words: frozenset[str] = CONTEXT_WORDS) -> ProfanityHits:
    """Listed words and phrases in `text` with their spans, less the allowed ones and (with
    `context_window`) those near a context word."""
    words, phrases = profanity_words()
    tokens = [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    found = [(t, a, b, i, i) for i, (t, a, b) in enumerate(tokens) if t in words]
    by_first = _phrases_by_first_word(phrases)
    for i, (t, a, _) in enumerate(tokens):
        for parts in by_first.get(t, ()):
            j = i + len(parts) - 1
            if j < len(tokens) and all(tokens[i + k][0] == w for k, w in enumerate(parts)):
                found.append((" ".join(parts), a, tokens[j][2], i, j))
    hits = ProfanityHits(n_words=len(tokens))
    # a listed word is never context for another ("sex organ" spares neither)
    near = _context_positions(tokens, context_words - words) if context_window else []
    for word, a, b, first, last in sorted(found, key=lambda h: h[1]):
        if word in allow:
            hits.spared.append((word, "allow"))
        elif near and _within(near, first, last, context_window):
            hits.spared.append((word, "context"))
        else:
            hits.fired.append((word, a, b))
    return hits


@lru_cache(maxsize=1)
def _phrases_by_first_word(phrases: tuple[str, ...]) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for p in phrases:
        parts = _WORD.findall(p)
        out.setdefault(parts[0], []).append(parts)
    return out


def _context_positions(tokens: list[tuple[str, int, int]], context: frozenset[str]
                       ) -> list[int]:
    return [i for i, (t, _, _) in enumerate(tokens) if t in context]


def _within(positions: list[int], first: int, last: int, window: int) -> bool:
    """Is a context word within `window` tokens of the hit (and not the hit itself)?"""
    for p in positions[bisect.bisect_left(positions, first - window):]:
        if p > last + window:
            return False
        if not first <= p <= last:
            return True
    return False


def count_profanity(text: str) -> tuple[int, int]:
    """(listed words and phrases, words) with no allow-list or context rule."""
    hits = find_profanity(text)
    return hits.count, hits.n_words


EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                      r"\.[A-Za-z]{2,}\b")
IPV4_RE = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                     r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\d)")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # +44 20 7946 0958
    r"|(?:\(\d{3}\)\s?|\d{3}[.-])\d{3}[.-]\d{4}"  # (555) 123-4567, 555-123-4567
    r")(?![\w])")
PII_PLACEHOLDERS = {"email": "[EMAIL]", "ip": "[IP_ADDRESS]", "phone": "[PHONE]"}


def _ipv6_sub(m: re.Match) -> str:
    s = m.group(0)
    if sum(1 for g in s.split(":") if g) < 2:
        return s
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return s
    return PII_PLACEHOLDERS["ip"]


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace emails, IP addresses (v4, and v6 that `ipaddress` accepts) and phone numbers
    with placeholders; returns the new text and counts per kind."""
    counts = {}
    text, counts["email"] = EMAIL_RE.subn(PII_PLACEHOLDERS["email"], text)
    text, counts["ip"] = IPV4_RE.subn(PII_PLACEHOLDERS["ip"], text)
    before = text.count(PII_PLACEHOLDERS["ip"])
    text = IPV6_RE.sub(_ipv6_sub, text)
    counts["ip"] += text.count(PII_PLACEHOLDERS["ip"]) - before
    text, counts["phone"] = PHONE_RE.subn(PII_PLACEHOLDERS["phone"], text)
    return text, counts


class PIIScrubber(Stage):
    """Replace emails, IPs and phone numbers with ``[EMAIL]``, ``[IP_ADDRESS]``,
    ``[PHONE]``; never removes a document. `kinds` picks which to scrub."""

    name = "pii"
    edits = True

    def __init__(self, kinds: list[str] | None = None):
        self.kinds = set(kinds or PII_PLACEHOLDERS)
        unknown = self.kinds - set(PII_PLACEHOLDERS)
        if unknown:
            raise UserValueError(f"unknown PII kinds {sorted(unknown)}; expected {sorted(PII_PLACEHOLDERS)}")

    def __call__(self, doc: Document) -> str | None:
        text, counts = scrub_pii(doc["text"]) if self.kinds == set(PII_PLACEHOLDERS) else \
            _scrub_some(doc["text"], self.kinds)
        doc["text"] = text
        if any(counts.values()):
            doc["pii"] = {k: v for k, v in counts.items() if v}
        return None


def _scrub_some(text: str, kinds: set[str]) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    if "email" in kinds:
        text, counts["email"] = EMAIL_RE.subn(PII_PLACEHOLDERS["email"], text)
    if "ip" in kinds:
        text, counts["ip"] = IPV4_RE.subn(PII_PLACEHOLDERS["ip"], text)
        text = IPV6_RE.sub(_ipv6_sub, text)
    if "phone" in kinds:
        text, counts["phone"] = PHONE_RE.subn(PII_PLACEHOLDERS["phone"], text)
    return text, counts


# ----------------------------------------------------------------------------- registry

STAGES: dict[str, type[Stage]] = {
    cls.name: cls for cls in (Normalize, HtmlToText, GopherQuality, GopherRepetition,
                              C4Quality, FineWebQuality, CodeQuality, LanguageFilter,
                              ProfanityFilter, PIIScrubber)
}


def parse_stage_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """A chain entry is a stage name or a one-key mapping ``{name: {param: value}}``."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and len(spec) == 1:
        (name, params), = spec.items()
        return str(name), dict(params or {})
    raise UserValueError("a chain entry is a stage name or a one-key mapping {name: {params}}")


def stage_params(name: str) -> set[str]:
    cls = STAGES[name]
    init = _datatrove_class(cls.target).__init__ if issubclass(cls, DatatroveFilter) \
        else cls.__init__
    params = set(inspect.signature(init).parameters) - {"self", "exclusion_writer"}
    return params


def validate_chain(chain: list[Any], path: str, fail: Fail) -> None:
    """Check every entry names a known stage with known parameters (without building it)."""
    if not isinstance(chain, list) or not chain:
        fail(path, "a chain is a non-empty list of stages")
    for i, spec in enumerate(chain):
        try:
            name, params = parse_stage_spec(spec)
        except ValueError as e:
            fail(f"{path}[{i}]", str(e))
        if name not in STAGES:
            fail(f"{path}[{i}]", f"unknown stage {name!r}; known: {', '.join(sorted(STAGES))}")
        unknown = set(params) - stage_params(name)
        if unknown:
            fail(f"{path}[{i}].{name}", f"unknown parameter(s) {sorted(unknown)}; known: "
                 f"{', '.join(sorted(stage_params(name)))}")


def build_chain(chain: list[Any], languages: list[str] | None = None,
                lang_threshold: float = 0.5) -> list[Stage]:
    """Instantiate a (validated) chain; the language stage takes the source's settings
    unless the chain entry sets its own."""
    stages = []
    for spec in chain:
        name, params = parse_stage_spec(spec)
        if name == "language":
            params.setdefault("languages", languages)
            params.setdefault("threshold", lang_threshold)
        if name in ("c4", "gopher_quality", "gopher_repetition", "fineweb"):
            params = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                      if isinstance(v, list) else v for k, v in params.items()}
        stages.append(STAGES[name](**params))
    return stages
