"""`mmfm report routing RUN`: RUN/reports/routing.html (figures embedded) + routing.json.

Numbers come from `mmfm.report.analysis` over the run's metrics.jsonl and routing records
(RUN/routing/heldout from `mmfm analyze`, else RUN/routing/train from training samples);
figures are drawn from those numbers; the page comes from a Jinja2 template. Every figure has a
one-line caption saying what it shows and what random / uniform routing would give. For runs
with modality expert groups (MoMa) the baselines are per group: a token only reaches its own
modality's E_group experts (`_baselines`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmfm.errors import UserValueError
from mmfm.report import analysis as A
from mmfm.report import figures as F
from mmfm.report.capture import HELDOUT, ROUTING_DIR, TRAIN_SAMPLES
from mmfm.report.records import MODALITIES, RoutingRecords, load_records, records_paths
from mmfm.report.render import render_page
from mmfm.report.run import read_metrics, run_config

# Distinct, readable colours for the token view (first-choice expert e gets COLOURS[e % n]).
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000",
           "#aaffc3", "#808000")


def load_run_records(run_dir: Path) -> tuple[str, list[RoutingRecords]]:
    """('heldout' | 'train' | 'none', records in step order)."""
    for kind in (HELDOUT, TRAIN_SAMPLES):
        paths = records_paths(run_dir / ROUTING_DIR / kind)
        if paths:
            return kind, [load_records(p) for p in paths]
    return "none", []


def _decoder(cfg):
    """token id -> printable text, with the run's tokenizer when it is still on disk."""
    try:
        from mmfm.data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError, ImportError):
        return lambda i: f"#{i}"
    return lambda i: tok.decode([int(i)], skip_special_tokens=False) or f"#{i}"


class _Page:
    """Sections of figures, tables and notes, gathered while the analyses run."""

    def __init__(self) -> None:
        self.sections: list[dict[str, Any]] = []

    def section(self, title: str, intro: str = "") -> dict[str, Any]:
        sec = {"title": title, "intro": intro, "figures": [], "tables": [], "html": []}
        self.sections.append(sec)
        return sec


def _figure(sec: dict[str, Any], src: str, alt: str, caption: str) -> None:
    sec["figures"].append({"src": src, "alt": alt, "caption": caption})


def _table(sec: dict[str, Any], header: list[str], rows: list[list[Any]], caption: str = "") -> None:
    sec["tables"].append({"header": header, "rows": [[_fmt(v) for v in r] for r in rows],
                          "caption": caption})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


# ----------------------------------------------------------------------------- sections


def _load_section(page: _Page, rows: list[dict[str, Any]], numbers: dict[str, Any]) -> None:
    series = A.load_over_training(rows)
    numbers["load_over_training"] = series
    sec = page.section("Load over training",
                       "Per-expert token share of the training batches in each logging window "
                       "(metrics.jsonl), per MoE layer.")
    if not series:
        sec["intro"] += " No per-expert loads were logged."
        return
    for layer, s in series.items():
        E = len(s["share"][0])
        _figure(sec, F.heatmap(np.asarray(s["share"]).T, f"{layer}: token share per expert",
                               "step", "expert", xticks=s["steps"]),
                f"{layer} load heatmap",
                f"Share of {layer}'s top-k assignments per expert and logged step; uniform is "
                f"1/E = {1 / E:.3f}.")
    steps = {k: v["steps"] for k, v in series.items()}
    _figure(sec, F.lines(steps, {k: v["maxvio"] for k, v in series.items()},
                         "MaxVio per logging window (batch)", "step", "MaxVio", baseline=0.0,
                         baseline_label="perfect balance"),
            "MaxVio over training",
            "MaxVio = (max load - mean load) / mean load of the logged window (arXiv 2408.15664); "
            "0 is perfect balance, E-1 all tokens on one expert.")
    _figure(sec, F.lines(steps, {k: [v or 0.0 for v in s["entropy"]] for k, s in series.items()},
                         "Router entropy", "step", "nats",
                         baseline=float(np.log(len(next(iter(series.values()))["share"][0]))),
                         baseline_label="uniform ln E"),
            "router entropy", "Mean entropy of the routing distribution per token; uniform "
                              "routing scores ln E (the dashed line).")
    _figure(sec, F.lines(steps, {k: [v or 0.0 for v in s["dropped"]] for k, s in series.items()},
                         "Dropped-token fraction", "step", "fraction", baseline=0.0,
                         baseline_label="no capacity limit"),
            "dropped fraction", "Share of top-k assignments dropped by the expert capacity "
                                "limit; 0 without a capacity factor.")
    biased = {k: s for k, s in series.items() if any(b and any(b) for b in s["bias"])}
    for layer, s in biased.items():
        bias = np.asarray([b or [0.0] * len(s["share"][0]) for b in s["bias"]])
        _figure(sec, F.lines({f"e{e}": s["steps"] for e in range(bias.shape[1])},
                             {f"e{e}": bias[:, e].tolist() for e in range(bias.shape[1])},
                             f"{layer}: aux-loss-free bias", "step", "bias", baseline=0.0,
                             baseline_label="no bias"),
                f"{layer} bias", "Aux-loss-free balancing bias per expert (arXiv 2408.15664): "
                                 "it rises for under-loaded experts; 0 without that balancing.")


def _baselines(final: RoutingRecords, per_group) -> str:
    """`per_group(E)` formatted for the run: one value over all E experts, or one per modality
    expert group (a token only reaches its own group's E_group experts)."""
    if not final.expert_groups:
        return f"{per_group(final.num_experts):.3f}"
    return "per expert group (E_group experts each) " + ", ".join(
        f"{name} {per_group(n):.3f}" for name, _, n in final.group_slices())


def _groups_note(final: RoutingRecords) -> str:
    if not final.expert_groups:
        return ""
    return (" Modality expert groups: global expert ids " + ", ".join(
        f"{name} {a}-{a + n - 1}" for name, a, n in final.group_slices()) + ".")


def _heldout_load_section(page: _Page, final: RoutingRecords, numbers: dict[str, Any]) -> None:
    counts_LE = A.expert_counts(final)
    layers = [f"layer_{i:02d}" for i in final.layers_L]
    groups = final.group_slices() if final.expert_groups else None
    found = A.dead_and_hot(counts_LE, final.layers_L.tolist(), groups=groups)
    numbers["heldout_load"] = {"step": final.step, "counts": counts_LE.tolist(),
                               "maxvio_global": [A.maxvio(c) for c in counts_LE], **found}
    if groups:
        numbers["heldout_load"]["expert_groups"] = {n: [a, c] for n, a, c in groups}
        numbers["heldout_load"]["maxvio_by_group"] = [A.group_maxvio(c, groups)
                                                      for c in counts_LE]
    uniform = "its group's uniform load" if groups else "the uniform load"
    sec = page.section(f"Dead and hot experts (held-out tokens, step {final.step})",
                       f"Dead: under 10% of {uniform}; hot: over 300%.{_groups_note(final)}")
    share_LE = counts_LE / counts_LE.sum(axis=1, keepdims=True)
    _figure(sec, F.heatmap(share_LE, "held-out token share per expert", "expert", "MoE layer",
                           yticks=layers),
            "held-out load", f"Share of the held-out tokens' top-k assignments per expert; "
                             f"uniform is 1/E = {1 / final.num_experts:.3f}"
                             + (" over all experts, but each modality group is balanced on its "
                                "own tokens (see the MaxVio per group)." if groups else "."))
    if groups:
        names = [n for n, _, _ in groups]
        _table(sec, ["layer"] + [f"MaxVio {n}" for n in names] + ["dead experts", "hot experts"],
               [[name] + [A.group_maxvio(c, groups)[n] for n in names]
                + [_experts_of(found["dead"], i), _experts_of(found["hot"], i)]
                for name, i, c in zip(layers, final.layers_L, counts_LE, strict=True)],
               "MaxVio of each modality group's experts over the held-out tokens (a group's "
               "tokens can only reach its own experts, so balance is measured within it).")
        return
    _table(sec, ["layer", "global MaxVio", "dead experts", "hot experts"],
           [[name, A.maxvio(c), _experts_of(found["dead"], i), _experts_of(found["hot"], i)]
            for name, i, c in zip(layers, final.layers_L, counts_LE, strict=True)],
           "Global MaxVio: the same statistic over all held-out tokens at once.")


def _experts_of(items: list[dict[str, Any]], layer: int) -> str:
    return ", ".join(f"{d['expert']} ({d['load_vs_uniform']:.2f}x)" for d in items
                     if d["layer"] == layer) or "none"


def _saturation_section(page: _Page, records: list[RoutingRecords], numbers: dict[str, Any],
                        kind: str) -> None:
    sec = page.section("Router saturation (OLMoE §5)",
                       "Overlap of each checkpoint's routing with the final checkpoint's on the "
                       f"same tokens ({kind} records).")
    if len(records) < 2:
        sec["intro"] += " Needs records of at least two steps: `mmfm analyze RUN --checkpoints all`."
        return
    final = records[-1]
    sat = {r.step: A.router_saturation(r, final) for r in records}
    numbers["saturation"] = {"steps": list(sat), "top1": [s["top1"] for s in sat.values()],
                             "topk": [s["topk"] for s in sat.values()],
                             "random_top1": 1 / final.num_experts,
                             "random_topk": final.top_k / final.num_experts}
    if final.expert_groups:
        numbers["saturation"]["random_by_group"] = {
            n: {"top1": 1 / c, "topk": final.top_k / c} for n, _, c in final.group_slices()}
    steps = list(sat)
    captions = {
        "topk": "top-k: mean |E_t ∩ E_T| / k of each token's expert set against the final "
                "step's; random routing gives k/E = {base}.",
        "top1": "top-1: share of tokens whose first choice equals the final step's; random "
                "routing gives 1/E = {base}.",
    }
    k = final.top_k
    for key, per in (("topk", lambda n: k / n), ("top1", lambda n: 1 / n)):
        base = None if final.expert_groups else per(final.num_experts)
        names = {f"layer_{i:02d}": [s[key][p] for s in sat.values()]
                 for p, i in enumerate(final.layers_L)}
        _figure(sec, F.lines({n: steps for n in names}, names, f"router saturation ({key})",
                             "step", "overlap with final", baseline=base, baseline_label="random"),
                f"saturation {key}",
                captions[key].format(base=_baselines(final, per) + ("" if base is None
                                                                   else " (dashed)")))


def _coactivation_section(page: _Page, final: RoutingRecords, numbers: dict[str, Any]) -> None:
    co = A.coactivation(final)
    numbers["coactivation"] = co
    sec = page.section("Expert co-activation")
    if final.top_k < 2:
        sec["intro"] = "Top-1 routing: no expert pairs within a token."
        return
    for p, layer in enumerate(final.layers_L):
        _figure(sec, F.heatmap(co[p], f"layer_{layer:02d}: P(expert j | expert i)", "expert j",
                               "expert i", vmin=0.0, vmax=1.0),
                f"co-activation layer {layer}",
                "P(j in top-k | i in top-k) over all pairs within each token's top-k set (OLMoE's "
                f"script counts neighbouring pairs only); random routing gives "
                f"(k-1)/(E-1) = {_baselines(final, lambda n: (final.top_k - 1) / max(n - 1, 1))}."
                + (" Experts of different modality groups never share a token."
                   if final.expert_groups else ""))


def _specialization_section(page: _Page, final: RoutingRecords, numbers: dict[str, Any],
                            by: str, within: tuple[str, int, int] | None = None) -> None:
    """Specialization by source or modality; `within` an expert group (name, first, count):
    by source over the tokens routed in that modality group only."""
    if by == "source":
        group_N, names = final.source_N, final.sources
    else:
        group_N, names = final.modality_N.astype(np.int16), list(MODALITIES)
        group_N = np.where(final.source_N >= 0, group_N, -1)
    key, title = f"specialization_by_{by}", f"Specialization by {by}"
    if within is not None:
        name, first, _ = within
        in_group_N = (final.experts_LNK[0, :, 0] >= first) & (
            final.experts_LNK[0, :, 0] < first + within[2])
        group_N = np.where(in_group_N, group_N, -1)
        title += f" within the {name} experts ({first}-{first + within[2] - 1})"
        numbers.setdefault(f"{key}_within_group", {})
    spec = A.specialization(final, group_N, names)
    if within is None:
        numbers[key] = spec
    else:
        numbers[f"{key}_within_group"][within[0]] = spec
    sec = page.section(title)
    if final.expert_groups and by == "modality":
        sec["intro"] = ("Modality expert groups: each modality is routed among its own experts, "
                        "so the score is 1 by construction; the bars show the balance within "
                        "each group.")
    if len(spec["groups"]) < 2:
        sec["intro"] = f"Only one {by} ({', '.join(spec['groups'])}) in the records: nothing to compare."
        return
    for p, layer in enumerate(final.layers_L):
        _figure(sec, F.grouped_bars(spec["share"][p], spec["groups"],
                                    [f"e{e}" for e in range(final.num_experts)],
                                    f"layer_{layer:02d}: share of each {by}'s tokens per expert",
                                    "share with expert in top-k", baseline=spec["uniform"],
                                    baseline_label="uniform k/E"),
                f"{by} specialization layer {layer}",
                f"Share of {by} D's tokens with expert i in the top-k; uniform routing gives "
                f"k/E = {_baselines(final, lambda n: final.top_k / n)}"
                + (" (dashed)." if spec["uniform"] is not None else
                   " on the experts of the token's own group, 0 elsewhere."))
    _table(sec, ["layer", "JS divergence (bits)", "specialization score"],
           [[f"layer_{i:02d}", b, s] for i, b, s in zip(final.layers_L, spec["js_bits"],
                                                         spec["score"], strict=True)],
           f"Score: generalized Jensen-Shannon divergence of P(expert | {by}) from P(expert), "
           f"divided by H({by}); 1 = each {by} has experts of its own, 0 = routing ignores it.")


def _vocabulary_section(page: _Page, final: RoutingRecords, numbers: dict[str, Any],
                        decode) -> None:
    columns = {"input token": "token_N", "next token": "next_N", "predicted token": "predicted_N"}
    vocab = {label: A.vocabulary_specialization(final, col) for label, col in columns.items()}
    numbers["vocabulary_specialization"] = vocab
    sec = page.section("Vocabulary specialization (OLMoE Fig. 23)")
    _table(sec, ["layer"] + list(columns),
           [[f"layer_{i:02d}"] + [vocab[c]["mean"][p] for c in columns]
            for p, i in enumerate(final.layers_L)],
           "Per token id seen >= 10 times, the share of its occurrences sent (first choice) to "
           f"its most frequent expert, occurrence-weighted; random routing gives about "
           f"1/E = {_baselines(final, lambda n: 1 / n)}.")
    tops = {}
    for p, layer in enumerate(final.layers_L):
        top = A.top_tokens_per_expert(final, p)
        tops[f"layer_{layer:02d}"] = top
        _table(sec, ["expert", f"layer_{layer:02d}: top input tokens (share sent here first)"],
               [[e, "  ".join(f"{decode(t)!r} {s:.2f}" for t, s in items) or "-"]
                for e, items in enumerate(top)])
    numbers["top_tokens_per_expert"] = tops


def _consecutive_section(page: _Page, final: RoutingRecords, numbers: dict[str, Any]) -> None:
    rates = A.consecutive_rates(final, final.source_N, final.sources)
    numbers["consecutive"] = rates
    sec = page.section("Consecutive tokens (Mixtral Table 5)")
    rows = [[f"layer_{i:02d}", "all", rates["all"]["top1"][p], rates["all"]["topk"][p]]
            for p, i in enumerate(final.layers_L)]
    for name, r in rates.get("by_group", {}).items():
        rows += [[f"layer_{i:02d}", name, r["top1"][p], r["topk"][p]]
                 for p, i in enumerate(final.layers_L)]
    _table(sec, ["layer", "source", "same first choice", "top-k sets share an expert"], rows,
           "Neighbouring tokens of the same passage; random routing gives 1/E = "
           f"{_baselines(final, lambda n: A.consecutive_baselines(n, final.top_k)['top1'])} and "
           "1 - C(E-k,k)/C(E,k) = "
           f"{_baselines(final, lambda n: A.consecutive_baselines(n, final.top_k)['topk'])}.")


def _token_view_section(page: _Page, final: RoutingRecords, numbers: dict[str, Any],
                        decode, layer_pos: int) -> None:
    view = A.token_view(final, layer_pos)
    numbers["token_view"] = {"layer": int(final.layers_L[layer_pos]), "passages": view}
    layer = int(final.layers_L[layer_pos])
    sec = page.section(f"Token view (layer_{layer:02d}, Mixtral Fig. 8)",
                       "Held-out passages with each token coloured by its first-choice expert; "
                       "under random routing colours change at random.")
    legend = " ".join(f'<span class="tok" style="background:{COLOURS[e % len(COLOURS)]}">'
                      f"expert {e}</span>" for e in range(final.num_experts))
    sec["html"].append(f"<p>{legend}</p>")
    for passage in view:
        spans = "".join(
            f'<span class="tok" style="background:{COLOURS[e % len(COLOURS)]}" '
            f'title="expert {e}">{html.escape(decode(t))}</span>'
            for t, e in zip(passage["tokens"], passage["experts"], strict=True))
        sec["html"].append(f"<p><b>{html.escape(passage['source'])}</b>: {spans}</p>")


# ----------------------------------------------------------------------------- report


def routing_report(run_dir: str | Path, layer: int | None = None) -> tuple[Path, Path]:
    """Write RUN/reports/routing.html and routing.json; return their paths."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if cfg.model.moe is None:
        raise UserValueError(f"run {run_dir} has no MoE layers (model.moe: null in "
                             f"{run_dir / 'config.yaml'}): there is no routing to report")
    rows = read_metrics(run_dir)
    kind, records = load_run_records(run_dir)
    numbers: dict[str, Any] = {"run": str(run_dir), "records": kind,
                               "record_steps": [r.step for r in records]}
    page = _Page()
    _load_section(page, rows, numbers)
    if records:
        _records_sections(page, records, numbers, kind, _decoder(cfg), layer)
    else:
        page.section("Routing records",
                     "This run has no routing records yet: run `mmfm analyze RUN` (or train with "
                     "metrics.routing_trace_every=N) for the held-out analyses.")
    out = run_dir / "reports"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "routing.json"
    json_path.write_text(json.dumps(numbers, indent=1, default=_json_default) + "\n")
    html_path = out / "routing.html"
    html_path.write_text(render_page("routing.html.j2", title=f"Routing report: {run_dir.name}",
                                     run=str(run_dir), sections=page.sections, kind=kind))
    return html_path, json_path


def _records_sections(page: _Page, records: list[RoutingRecords], numbers: dict[str, Any],
                      kind: str, decode, layer: int | None) -> None:
    final = records[-1]
    layers = final.layers_L.tolist()
    numbers["moe_layers"] = layers  # decoder layer of each per-layer list below
    if layer is not None and layer not in layers:
        raise UserValueError(f"--layer {layer} is not an MoE layer of this run (MoE layers: {layers})")
    layer_pos = layers.index(layer) if layer is not None else len(layers) - 1
    _heldout_load_section(page, final, numbers)
    _saturation_section(page, records, numbers, kind)
    _coactivation_section(page, final, numbers)
    _specialization_section(page, final, numbers, "source")
    for group in final.group_slices() if final.expert_groups else ():
        _specialization_section(page, final, numbers, "source", within=group)
    if len(set(final.modality_N[final.source_N >= 0].tolist())) > 1:
        _specialization_section(page, final, numbers, "modality")
    _vocabulary_section(page, final, numbers, decode)
    _consecutive_section(page, final, numbers)
    _token_view_section(page, final, numbers, decode, layer_pos)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
