"""The curation report as a self-contained HTML page: a Jinja2 template, matplotlib figures
embedded as base64 PNG (no network, no files beside it), removed examples with the words that
triggered their removal highlighted.

Figures, each a pure function of the report dict (``report.json``):

* removal funnel per source: share of documents each stage removed, and what was kept;
* document lengths (characters, log2 bins) as read, after the filters, after dedup;
* duplicate-cluster sizes (exact and near);
* token shares of the mixture: target, as curated (before up/down-sampling), realized.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import jinja2
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

KEPT_COLOR = "#d0d0d0"  # light grey, so the removals stand out


def render_html(report: dict[str, Any]) -> str:
    """The page for `report` (the dict written to report.json)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["thousands"] = lambda n: f"{n:,}" if isinstance(n, int | float) else n
    figures = [(title, _png(draw, report)) for title, draw in FIGURES]
    return env.from_string(TEMPLATE).render(
        r=report, figures=figures, funnel=funnel_rows(report), examples=example_rows(report))


# ----------------------------------------------------------------------------- numbers

def funnel_rows(report: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """Per source: [(step, documents it removed)...] then ("kept", n), in chain order."""
    out: dict[str, list[tuple[str, int]]] = {}
    for name, s in report["sources"].items():
        rows = [(st, c["docs_in"] - c["docs_out"]) for st, c in s["stages"].items()]
        d = s.get("dedup") or {}
        rows += [("exact dedup", d.get("exact_duplicate", 0)),
                 ("near dedup", d.get("near_duplicate", 0))]
        last = list(s["stages"].values())[-1]["docs_out"] if s["stages"] else 0
        out[name] = rows + [("kept", d.get("docs_out", last))]
    return out


def highlight(text: str, spans: list[list[int]]) -> list[tuple[str, bool]]:
    """`text` cut into (piece, is_trigger) at the spans (sorted, overlaps merged)."""
    pieces: list[tuple[str, bool]] = []
    at = 0
    for a, b in sorted(spans):
        a, b = max(a, at), min(b, len(text))
        if a >= b:
            continue
        pieces += [(text[at:a], False), (text[a:b], True)]
        at = b
    pieces.append((text[at:], False))
    return [p for p in pieces if p[0]]


def example_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per source and removal reason: count, the words that fired, highlighted examples."""
    rows = []
    for name, s in report["sources"].items():
        for reason, count in sorted(s["removed_by_reason"].items(), key=lambda x: -x[1]):
            fired = s.get("fired_words", {}).get(reason, {})
            rows.append({"source": name, "reason": reason, "count": count,
                         "fired": list(fired.items())[:15],
                         "examples": [{"id": ex["id"], "rule": ex.get("rule") or reason,
                                       "words": ex.get("words", {}),
                                       "offset": ex.get("offset", 0),
                                       "pieces": highlight(ex["text"], ex.get("spans", []))}
                                      for ex in s["removed_examples"].get(reason, [])]})
    return rows


# ----------------------------------------------------------------------------- figures

def _png(draw: Callable[[Figure, dict[str, Any]], None], report: dict[str, Any]) -> str:
    fig = Figure(figsize=(9, 3.6), dpi=96, layout="constrained")
    draw(fig, report)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def draw_funnel(fig: Figure, report: dict[str, Any]) -> None:
    rows = funnel_rows(report)
    steps = list(dict.fromkeys(st for r in rows.values() for st, _ in r if st != "kept"))
    palette = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (14, 15)]
    colors = {st: palette[i % len(palette)] for i, st in enumerate(steps)}  # no greys
    colors["kept"] = KEPT_COLOR
    ax = fig.add_subplot()
    names = list(rows)
    for y, name in enumerate(names):
        total = sum(n for _, n in rows[name]) or 1
        left = 0.0
        for st, n in rows[name]:
            if n:
                ax.barh(y, n / total, left=left, color=colors[st], edgecolor="white",
                        label=st)
                left += n / total
        ax.text(1.01, y, f"{total:,} docs", va="center", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), fontsize=7, loc="outside right upper")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the source's documents (removed by each step, then kept)")
    ax.set_title("Removal funnel per source")


def draw_lengths(fig: Figure, report: dict[str, Any]) -> None:
    names = [n for n, s in report["sources"].items() if s.get("length_hist")]
    cols = min(3, max(len(names), 1))
    rows = (len(names) + cols - 1) // cols or 1
    fig.set_size_inches(9, 2.2 * rows + 0.6)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for stage, style in (("read", "-"), ("filtered", "--"), ("curated", ":")):
            hist = report["sources"][name]["length_hist"].get(stage)
            if not hist:
                continue
            bins = sorted(int(k) for k in hist)
            ax.step([2 ** max(k - 1, 0) for k in bins], [hist[str(k)] for k in bins],
                    style, where="post", label=stage)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.supxlabel("document length, characters (log2 bins)", fontsize=8)
    fig.supylabel("documents", fontsize=8)


def draw_clusters(fig: Figure, report: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    d = report["dedup"]
    width = 0.4
    for j, kind in enumerate(("exact", "near")):
        hist = d[f"{kind}_cluster_sizes"]
        sizes = sorted(int(k) for k in hist)
        ax.bar([s + (j - 0.5) * width for s in sizes], [hist[str(s)] for s in sizes],
               width=width, label=f"{kind} ({sum(hist.values()):,} clusters)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a single cluster still shows as a bar
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("cluster size (documents; one kept, the others removed)")
    ax.set_ylabel("clusters")
    ax.set_title("Duplicate-cluster sizes")
    ax.legend(fontsize=8)


def draw_shares(fig: Figure, report: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    entries = report["mixture"]
    per = report["tokenizer"]["per_source"]
    total = sum(v["tokens"] for v in per.values()) or 1
    series = {"target": [e["mixture"]["target_share"] for e in entries],
              "curated (before mixing)": [per.get(e["name"], {}).get("tokens", 0) / total
                                          for e in entries],
              "realized (train)": [e["mixture"]["realized_share"] for e in entries]}
    width = 0.27
    for j, (label, values) in enumerate(series.items()):
        ax.bar([i + (j - 1) * width for i in range(len(entries))], values, width=width,
               label=label)
    ax.set_xticks(range(len(entries)), [e["name"] for e in entries], fontsize=8)
    ax.set_ylabel("share of tokens")
    ax.set_title("Token shares of the mixture against the targets")
    ax.legend(fontsize=8)


FIGURES: list[tuple[str, Callable[[Figure, dict[str, Any]], None]]] = [
    ("Removal funnel per source", draw_funnel),
    ("Document lengths before and after", draw_lengths),
    ("Duplicate-cluster sizes", draw_clusters),
    ("Token shares against targets", draw_shares),
]


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Curation report {{ r.recipe }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right;font-size:14px}
td:first-child,th:first-child{text-align:left}
th{background:#f3f3f3}
figure{margin:1em 0}
figure img{max-width:100%}
mark{background:#ffd54f;padding:0 1px}
.example{border-left:3px solid #bbb;padding:.3em .8em;margin:.4em 0 .8em;white-space:pre-wrap;
 font-family:ui-monospace,monospace;font-size:13px;background:#fafafa}
.meta{color:#666;font-size:13px}
code{background:#f3f3f3;padding:0 3px}
</style></head><body>
<h1>Curation report: {{ r.recipe }}</h1>
<p class="meta">Recipe fingerprint <code>{{ r.fingerprint }}</code>. Token counts marked ~ are
estimates (characters x the source's measured tokens per character).</p>

<h2>Figures</h2>
{% for title, png in figures %}
<figure><img alt="{{ title }}" src="data:image/png;base64,{{ png }}">
<figcaption class="meta">{{ title }}</figcaption></figure>
{% endfor %}

<h2>Sources read</h2>
<table><tr><th>source</th><th>kind</th><th>files</th><th>docs</th><th>skipped</th>
<th>notes</th></tr>
{% for name, s in r.sources.items() %}
<tr><td>{{ name }}</td><td>{{ s.kind }}</td><td>{{ s.read.files | thousands }}</td>
<td>{{ s.read.docs | thousands }}</td><td>{{ s.read.skipped | thousands }}</td>
<td>{{ s.notes | join("; ") }}</td></tr>
{% endfor %}
</table>

<h2>Stages per source</h2>
{% for name, s in r.sources.items() %}
<h3>{{ name }}</h3>
<table><tr><th>step</th><th>docs in</th><th>docs out</th><th>removed</th><th>modified</th>
<th>chars in</th><th>chars out</th><th>tokens in</th><th>tokens out</th></tr>
{% for st, c in s.stages.items() %}
<tr><td>{{ st }}</td><td>{{ c.docs_in | thousands }}</td><td>{{ c.docs_out | thousands }}</td>
<td>{{ (c.docs_in - c.docs_out) | thousands }}</td><td>{{ c.modified | thousands }}</td>
<td>{{ c.chars_in | thousands }}</td><td>{{ c.chars_out | thousands }}</td>
<td>~{{ c.tokens_in_est | thousands }}</td><td>~{{ c.tokens_out_est | thousands }}</td></tr>
{% endfor %}
{% if s.dedup %}
<tr><td>dedup (exact / near)</td><td>{{ s.dedup.docs_in | thousands }}</td>
<td>{{ s.dedup.docs_out | thousands }}</td>
<td>{{ s.dedup.get("exact_duplicate", 0) }} / {{ s.dedup.get("near_duplicate", 0) }}</td>
<td></td><td></td><td></td><td></td><td></td></tr>
{% endif %}
</table>
{% endfor %}

<h2>Removed examples</h2>
{% for row in examples %}
<h3>{{ row.source }}: <code>{{ row.reason }}</code>, {{ row.count | thousands }} removed</h3>
{% if row.fired %}
<p>Words that fired (all removed documents):
{% for w, n in row.fired %}<mark>{{ w }}</mark> x{{ n }}{{ ", " if not loop.last }}{% endfor %}
</p>
{% endif %}
{% for ex in row.examples %}
<p class="meta"><code>{{ ex.id }}</code>, rule: {{ ex.rule }}{% if ex.words %}; words:
{% for w, n in ex.words.items() %}{{ w }} x{{ n }}{{ ", " if not loop.last }}{% endfor %}
{% endif %}{% if ex.offset %}; from character {{ ex.offset | thousands }}{% endif %}</p>
<div class="example">{% for piece, hit in ex.pieces %}{% if hit %}<mark>{{ piece }}</mark>
{%- else %}{{ piece }}{% endif %}{% endfor %}</div>
{% endfor %}
{% endfor %}

<h2>Duplicates</h2>
<p>{{ r.dedup.docs | thousands }} documents entered dedup ({{ r.dedup.seconds }} s).</p>
{% for kind in ("exact", "near") %}
<h3>{{ kind }} clusters, examples</h3>
{% if r.dedup.example_clusters[kind] %}
<table><tr><th>kept</th><th>removed as its duplicates</th></tr>
{% for c in r.dedup.example_clusters[kind] %}
<tr><td><code>{{ c[0] }}</code></td><td style="text-align:left">{{ c[1:] | join(", ") }}</td></tr>
{% endfor %}
</table>
{% else %}<p>none</p>{% endif %}
{% endfor %}

<h2>Mixture</h2>
<table><tr><th>source</th><th>curated tokens</th><th>target share</th><th>epochs</th>
<th>capped</th><th>train tokens</th><th>realized share</th><th>train docs</th><th>val docs</th></tr>
{% for e in r.mixture %}
<tr><td>{{ e.name }}</td><td>{{ e.mixture.tokens | thousands }}</td>
<td>{{ e.mixture.target_share }}</td><td>{{ e.mixture.epochs }}</td>
<td>{{ "yes" if e.mixture.capped }}</td><td>{{ e.tokens.train | thousands }}</td>
<td>{{ e.mixture.realized_share }}</td><td>{{ e.docs.train | thousands }}</td>
<td>{{ e.docs.val | thousands }}</td></tr>
{% endfor %}
</table>

<h2>Tokenizer</h2>
<p><code>{{ r.tokenizer.path }}</code>: vocab {{ r.tokenizer.vocab_size | thousands }},
{{ r.tokenizer.bytes_per_token }} bytes/token overall.</p>
<table><tr><th>source</th><th>docs</th><th>bytes</th><th>tokens</th><th>bytes/token</th></tr>
{% for name, v in r.tokenizer.per_source.items() %}
<tr><td>{{ name }}</td><td>{{ v.docs | thousands }}</td><td>{{ v.bytes | thousands }}</td>
<td>{{ v.tokens | thousands }}</td><td>{{ v.bytes_per_token }}</td></tr>
{% endfor %}
</table>

<h2>Timings</h2>
<table><tr><th>step</th><th>seconds</th></tr>
{% for k, v in r.timings.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>
{% endfor %}
</table>
</body></html>
"""
