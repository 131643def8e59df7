"""`mmfm analyze RUN` and `mmfm report routing|compare`: register with `register(sub)`."""

from __future__ import annotations

import argparse


def cmd_analyze(args: argparse.Namespace) -> int:
    from mmfm.report.capture import analyze_run

    data = dict(_name_value(item) for item in args.data or [])
    for path in analyze_run(args.run, args.checkpoints, tokens=args.tokens, data=data):
        print(path)
    return 0


def _name_value(item: str) -> tuple[str, str]:
    from mmfm.errors import UserValueError

    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise UserValueError(f"--data {item!r} is not of the form NAME=SHARDS_DIR")
    return name, value


def cmd_report_routing(args: argparse.Namespace) -> int:
    import json

    from mmfm.report.routing import routing_report
    from mmfm.report.summary import routing_headlines

    html, json_path = routing_report(args.run, layer=args.layer)
    print(html)
    print(json_path)
    for line in routing_headlines(json.loads(json_path.read_text())):
        print(line)
    return 0


def cmd_report_compare(args: argparse.Namespace) -> int:
    import json

    from mmfm.report.compare import compare_report
    from mmfm.report.summary import compare_headlines

    html, json_path = compare_report(args.runs, out_dir=args.out)
    print(html)
    print(json_path)
    for line in compare_headlines(json.loads(json_path.read_text())):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `analyze` and `report` to the top-level `mmfm` parser."""
    analyze = sub.add_parser(
        "analyze", help="capture expert routing of held-out tokens through checkpoints",
        description="Run the same held-out tokens through each chosen checkpoint of RUN (eval "
                    "mode, no grad, fp32) and write routing records (top-k experts, gate "
                    "weights, token, next and predicted token, source, modality) to "
                    "RUN/routing/heldout/step_XXXXXXXX.npz.")
    analyze.add_argument("run", help="run folder (holds config.yaml and checkpoints/)")
    analyze.add_argument("--checkpoints", nargs="+", default=["latest"], metavar="WHICH",
                         help="all, latest (default) or step numbers")
    analyze.add_argument("--tokens", type=int, default=16384,
                         help="held-out tokens to route (default 16384), split evenly over sources")
    analyze.add_argument("--data", nargs="+", metavar="NAME=SHARDS",
                         help="held-out token shard folders, each named as a source; default: "
                              "the run's validation data with its own sources")
    analyze.set_defaults(func=cmd_analyze)

    report = sub.add_parser("report", help="routing and comparison reports (HTML + JSON)",
                            description="Self-contained HTML reports with figures, and their "
                                        "numbers as JSON.")
    kinds = report.add_subparsers(dest="report", required=True)
    routing = kinds.add_parser(
        "routing", help="expert-routing analysis of one run -> RUN/reports/routing.html",
        description="Load over training, MaxVio, dead/hot experts, router saturation, "
                    "co-activation, specialization by source and modality, vocabulary "
                    "specialization, consecutive-token rates and a token view, from RUN's "
                    "metrics.jsonl and routing records (run `mmfm analyze RUN` first).")
    routing.add_argument("run", help="run folder")
    routing.add_argument("--layer", type=int, default=None,
                         help="decoder layer for the token view (default: the last MoE layer)")
    routing.set_defaults(func=cmd_report_routing)
    compare = kinds.add_parser(
        "compare", help="validation loss of runs vs tokens, FLOPs and time -> compare.html",
        description="Compare runs (e.g. an MoE and its dense twin) on the same validation "
                    "data: loss against tokens, FLOPs and wall-clock, tokens/FLOPs/time to "
                    "reach each other's final loss, and their configs side by side.")
    compare.add_argument("runs", nargs="+", help="two or more run folders")
    compare.add_argument("--out", default=None,
                         help="output folder (default: the first run's reports/)")
    compare.set_defaults(func=cmd_report_compare)
