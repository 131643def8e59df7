"""The curation report: per source and stage documents / characters / tokens in and out,
removed examples per filter, duplicate clusters, mixture and tokenizer tables.

Built from the task stats, the dedup result and the mixture entries; written as
``report.json`` (everything), ``report.md`` (the tables) and ``report.html`` (tables, figures
and highlighted removed examples, see :mod:`~mmfm.data.curation.report_html`).
Token counts before the tokenizer exists are estimates: characters x the source's measured
tokens per character on its curated text (marked ``~``); final counts are exact.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mmfm.data.curation.recipe import Recipe
from mmfm.data.curation.sources import SourceStats


def merge_task_stats(recipe: Recipe, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the per-task stats into per-source stage tables (chain order kept)."""
    k = recipe.report.examples_per_filter
    out: dict[str, Any] = {}
    for src in recipe.sources:
        read = SourceStats()
        stages: dict[str, dict[str, int]] = {}
        reasons: dict[str, int] = defaultdict(int)
        examples: dict[str, list[Any]] = defaultdict(list)
        fired: dict[str, Counter[str]] = defaultdict(Counter)
        lengths: dict[str, Counter[str]] = defaultdict(Counter)
        notes = set()
        for t in tasks:
            s = t["sources"][src.name]
            if s["read"] is not None:
                read.merge(s["read"])
            for name, c in s["stages"].items():
                acc = stages.setdefault(name, dict.fromkeys(c, 0))
                for key, v in c.items():
                    acc[key] += v
            for r, n in s["reasons"].items():
                reasons[r] += n
            for r, ex in s["examples"].items():
                examples[r].extend(ex[: k - len(examples[r])])
            for r, words in s.get("fired_words", {}).items():
                fired[r].update(words)
            for stage, hist in s.get("length_hist", {}).items():
                lengths[stage].update(hist)
            if s.get("note"):
                notes.add(s["note"])
        out[src.name] = {"kind": src.kind, "license": src.license, "read": read.as_dict(),
                         "stages": stages, "removed_by_reason": dict(reasons),
                         "removed_examples": dict(examples), "notes": sorted(notes),
                         "fired_words": {r: dict(c.most_common()) for r, c in fired.items()},
                         "length_hist": {k: dict(v) for k, v in lengths.items()}}
    return out


def length_bin(chars: int) -> int:
    """Log2 length bin: documents of 2**(k-1) .. 2**k - 1 characters fall in bin k."""
    return int(chars).bit_length()


def build_report(recipe: Recipe, sources: dict[str, Any], dedup: dict[str, Any],
                 tok_report: dict[str, Any], entries: list[dict[str, Any]],
                 timings: dict[str, Any], curated: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Everything the report shows; `curated` (write_curated's counts) adds each source's
    length histogram after dedup."""
    for name, s in (curated or {}).items():
        if name in sources and "length_hist" in s:
            sources[name].setdefault("length_hist", {})["curated"] = s["length_hist"]
    for name, s in sources.items():
        tpc = _tokens_per_char(tok_report["per_source"].get(name, {}))
        for c in s["stages"].values():
            c["tokens_in_est"] = round(c["chars_in"] * tpc)
            c["tokens_out_est"] = round(c["chars_out"] * tpc)
        d = dedup["per_source"].get(name, {})
        s["dedup"] = d
    return {"recipe": recipe.name, "fingerprint": recipe.fingerprint(), "sources": sources,
            "dedup": {k: dedup[k] for k in ("docs", "exact_cluster_sizes", "near_cluster_sizes",
                                            "example_clusters", "seconds")},
            "tokenizer": tok_report, "mixture": entries, "timings": timings}


def _tokens_per_char(t: dict[str, Any]) -> float:
    return t["tokens"] / t["chars"] if t.get("chars") else 0.25


def write_report(report: dict[str, Any], out: Path, as_html: bool = True) -> list[Path]:
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md = to_markdown(report)
    paths[1].write_text(md, encoding="utf-8")
    if as_html:
        paths.append(out / "report.html")
        paths[2].write_text(to_html(report), encoding="utf-8")
    return paths


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines + [""]


def to_markdown(r: dict[str, Any]) -> str:
    lines = [f"# Curation report: {r['recipe']}", "",
             f"Recipe fingerprint `{r['fingerprint']}`. Token counts marked `~` are estimates "
             "(characters x the source's measured tokens per character).", ""]
    lines += ["## Sources: read", ""]
    rows = [[n, s["kind"], s["read"]["files"], s["read"]["docs"], s["read"]["skipped"],
             ", ".join(f"{k[8:]}={v}" for k, v in s["read"].items()
                       if k.startswith("skipped_") and k != "skipped_examples" and v) or "-",
             "; ".join(s["notes"]) or ""] for n, s in r["sources"].items()]
    lines += _table(["source", "kind", "files", "docs", "skipped", "skipped by kind", "notes"],
                    rows)
    lines += ["## Stages per source", ""]
    for n, s in r["sources"].items():
        lines += [f"### {n}", ""]
        rows = [[st, c["docs_in"], c["docs_out"], c["docs_in"] - c["docs_out"], c["modified"],
                 f"{c['chars_in']:,}", f"{c['chars_out']:,}", f"~{c['tokens_in_est']:,}",
                 f"~{c['tokens_out_est']:,}"] for st, c in s["stages"].items()]
        d = s["dedup"]
        if d:
            removed = d.get("exact_duplicate", 0) + d.get("near_duplicate", 0)
            rows.append(["dedup (exact / near)", d.get("docs_in", 0), d.get("docs_out", 0),
                         f"{removed} ({d.get('exact_duplicate', 0)} / "
                         f"{d.get('near_duplicate', 0)})", "", "", "", "", ""])
        lines += _table(["stage", "docs in", "docs out", "removed", "modified", "chars in",
                         "chars out", "tokens in", "tokens out"], rows)
    lines += ["## Removed examples per filter", ""]
    for n, s in r["sources"].items():
        for reason, count in sorted(s["removed_by_reason"].items(), key=lambda x: -x[1]):
            lines.append(f"- **{n} / {reason}**: {count} removed")
            for ex in s["removed_examples"].get(reason, []):
                snippet = " ".join(ex["text"].split())[:160]
                lines.append(f"    - `{ex['id']}`: {snippet}")
    lines += ["", "## Duplicates", ""]
    d = r["dedup"]
    lines.append(f"{d['docs']} documents entered dedup ({d['seconds']} s).")
    for kind in ("exact", "near"):
        hist = d[f"{kind}_cluster_sizes"]
        lines.append(f"- {kind} clusters by size: " +
                     (", ".join(f"{k}: {v}" for k, v in hist.items()) or "none"))
        for c in d["example_clusters"][kind]:
            lines.append(f"    - kept `{c[0]}`, removed {', '.join(f'`{x}`' for x in c[1:])}")
    lines += ["", "## Mixture", ""]
    rows = [[e["name"], f"{e['mixture']['tokens']:,}", e["mixture"]["target_share"],
             e["mixture"]["epochs"], "yes" if e["mixture"]["capped"] else "",
             f"{e['tokens']['train']:,}", e["mixture"]["realized_share"], e["docs"]["train"],
             e["docs"]["val"]] for e in r["mixture"]]
    lines += _table(["source", "curated tokens", "target share", "epochs", "capped",
                     "train tokens", "realized share", "train docs", "val docs"], rows)
    t = r["tokenizer"]
    lines += ["## Tokenizer", "", f"`{t['path']}`: vocab {t['vocab_size']}, "
              f"{t['bytes_per_token']} bytes/token overall.", ""]
    rows = [[n, v["docs"], f"{v['bytes']:,}", f"{v['tokens']:,}", v["bytes_per_token"]]
            for n, v in t["per_source"].items()]
    lines += _table(["source", "docs", "bytes", "tokens", "bytes/token"], rows)
    lines += ["## Timings", "", "```", json.dumps(r["timings"], indent=1), "```", ""]
    return "\n".join(lines)


def to_html(r: dict[str, Any]) -> str:
    """The report as a self-contained HTML page (Jinja2 + matplotlib figures)."""
    from mmfm.data.curation.report_html import render_html  # matplotlib only when asked

    return render_html(r)
