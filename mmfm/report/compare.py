"""`mmfm report compare RUN_A RUN_B ...`: compare.html + compare.json.

Validation loss (overall and per source) against training tokens, training FLOPs (the
project's 6·N_active + attention convention, `mmfm.model.counting.flops_per_token`) and
wall-clock; the tokens, FLOPs and time at which each run first reaches each other run's final
validation loss (linear interpolation between evaluations), as ratios; the runs' configs side by
side with differences highlighted. Runs with different tokenizers or validation sets are refused;
a run still in progress is compared up to its last evaluation.

metrics.jsonl keys read per record: `val/loss`, `val/loss/<source>`, `tokens` (seen so far),
`flops` (cumulative training FLOPs), `time/wall_s`. Where a run predates those keys: tokens =
step x tokens per step (from config.yaml), FLOPs = tokens x FLOPs per token, wall = the sum of the
logged `perf/step_s` over the steps between logs (marked approximate).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfm.errors import UserValueError
from mmfm.report import figures as F
from mmfm.report.render import render_page
from mmfm.report.run import read_metrics, run_config

AXES = {"tokens": "training tokens", "flops": "training FLOPs", "wall_s": "wall-clock seconds"}


@dataclass
class RunCurve:
    """One run's validation curve against the three x-axes."""

    name: str
    path: Path
    config: dict[str, Any]
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    x: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in AXES})
    by_source: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (tokens, loss)
    approximate: list[str] = field(default_factory=list)
    finished: bool = False


def _tokens_per_step(cfg) -> int:
    world = getattr(cfg.parallel, "dp", 1) or 1
    return cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len * max(1, world)


def read_curve(run_dir: Path) -> RunCurve:
    """The run's validation evaluations with tokens, FLOPs and wall time at each."""
    from mmfm.model.counting import flops_per_token

    cfg = run_config(run_dir)
    curve = RunCurve(run_dir.name, run_dir, cfg.to_dict())
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    wall, last_logged = 0.0, 0
    for row in read_metrics(run_dir):
        if "perf/step_s" in row:  # fallback clock: logged step time x steps since last log
            wall += row["perf/step_s"] * (row["step"] - last_logged)
            last_logged = row["step"]
        if "val/loss" not in row:
            continue
        tokens = row.get("tokens", row["step"] * _tokens_per_step(cfg))
        values = {"tokens": tokens, "flops": row.get("flops", tokens * per_token),
                  "wall_s": row.get("time/wall_s", wall)}
        for key, src in (("tokens", "tokens"), ("flops", "flops"), ("wall_s", "time/wall_s")):
            if src not in row and key not in curve.approximate:
                curve.approximate.append(key)
        curve.steps.append(int(row["step"]))
        curve.loss.append(float(row["val/loss"]))
        for key, value in values.items():
            curve.x[key].append(float(value))
        for key, value in row.items():
            if key.startswith("val/loss/"):
                curve.by_source.setdefault(key[len("val/loss/"):], []).append((tokens, value))
    if not curve.steps:
        raise UserValueError(f"{run_dir / 'metrics.jsonl'} holds no evaluation (val/loss) yet")
    curve.finished = curve.steps[-1] >= cfg.train.steps
    return curve


def reach(x: list[float], loss: list[float], target: float) -> float | None:
    """The first x at which the curve reaches `target` loss, linearly interpolated between
    evaluations; None when it never does."""
    if loss[0] <= target:
        return x[0]
    for i in range(1, len(loss)):
        if loss[i] <= target:
            frac = (loss[i - 1] - target) / (loss[i - 1] - loss[i])
            return x[i - 1] + frac * (x[i] - x[i - 1])
    return None


def reach_ratios(curves: list[RunCurve]) -> list[dict[str, Any]]:
    """For each ordered pair (A, B): where A first reaches B's final loss, divided by where B
    got it (B's last evaluation), on each axis. Below 1: A needed less to match B."""
    out = []
    for a in curves:
        for b in curves:
            if a is b:
                continue
            target = b.loss[-1]
            item: dict[str, Any] = {"run": a.name, "reaches": b.name, "target_loss": target}
            for axis in AXES:
                at = reach(a.x[axis], a.loss, target)
                item[axis] = at
                item[f"{axis}_ratio"] = at / b.x[axis][-1] if at is not None and b.x[axis][-1] else None
            out.append(item)
    return out


def _val_set_identity(cfg: dict[str, Any], run_dir: Path) -> tuple[str, str]:
    """(tokenizer id, validation-set id) of a run: fingerprints read from the data on disk
    where it still exists, else the configured paths."""
    data = cfg["data"]
    tok = _tokenizer_id(Path(data["tokenizer"]))
    if cfg["data"]["kind"] == "multimodal":
        val = json.dumps(sorted((k, v.get("val")) for k, v in
                                (cfg.get("multimodal") or {}).get("sources", {}).items()))
    else:
        index = Path(data["val_shards"]) / "index.json"
        val = hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else str(
            data["val_shards"])
    batches = (data["seq_len"], cfg["train"]["eval_batches"], cfg["train"]["micro_batch_size"])
    return tok, f"{val} seq_len={batches[0]} eval rows={batches[1] * batches[2]}"


def _tokenizer_id(path: Path) -> str:
    try:
        from mmfm.data.tokenizer import load_tokenizer, tokenizer_fingerprint

        return tokenizer_fingerprint(load_tokenizer(path))
    except (OSError, ValueError):
        return str(path)


def check_comparable(curves: list[RunCurve]) -> None:
    """Refuse runs whose losses are not on the same scale: another tokenizer or validation set."""
    first = curves[0]
    tok0, val0 = _val_set_identity(first.config, first.path)
    for other in curves[1:]:
        tok, val = _val_set_identity(other.config, other.path)
        if tok != tok0:
            raise UserValueError(f"runs {first.path} and {other.path} use different tokenizers "
                                 f"({first.config['data']['tokenizer']} vs "
                                 f"{other.config['data']['tokenizer']}): their losses are not "
                                 "comparable")
        if val != val0:
            raise UserValueError(f"runs {first.path} and {other.path} are validated on different "
                                 f"data ({val0} vs {val}): their losses are not comparable")


def config_diff(curves: list[RunCurve]) -> tuple[list[list[Any]], list[bool]]:
    """Rows [key, value per run] of every config field, and whether the runs differ there
    (different rows first); `run.name` and `run.out_dir` always differ and are left out."""
    flat = [_flatten(c.config) for c in curves]
    keys = sorted(set().union(*flat) - {"run.name", "run.out_dir"})
    rows = [[k] + [json.dumps(f.get(k)) for f in flat] for k in keys]
    differs = [len({r for r in row[1:]}) > 1 for row in rows]
    order = sorted(range(len(rows)), key=lambda i: not differs[i])
    return [rows[i] for i in order], [differs[i] for i in order]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def compare_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write compare.html and compare.json (into `out_dir`, default RUN_A/reports)."""
    if len(run_dirs) < 2:
        raise UserValueError("mmfm report compare needs at least two run folders")
    paths = [Path(p) for p in run_dirs]
    curves = [read_curve(p) for p in paths]
    names = [c.name for c in curves]
    if len(set(names)) < len(names):  # same folder names under different parents
        for c, p in zip(curves, paths, strict=True):
            c.name = str(p)
    check_comparable(curves)
    ratios = reach_ratios(curves)
    rows, differs = config_diff(curves)
    numbers = {"runs": [_curve_json(c) for c in curves], "reach": ratios,
               "config_differences": {r[0]: r[1:] for r, d in zip(rows, differs, strict=True) if d}}
    out = Path(out_dir) if out_dir is not None else paths[0] / "reports"
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(numbers, indent=1) + "\n")
    html_path = out / "compare.html"
    html_path.write_text(render_page("compare.html.j2", title="Run comparison: " + " vs ".join(
        c.name for c in curves), sections=_sections(curves, ratios, rows, differs)))
    return html_path, json_path


def _curve_json(c: RunCurve) -> dict[str, Any]:
    return {"name": c.name, "path": str(c.path), "finished": c.finished, "steps": c.steps,
            "val_loss": c.loss, **c.x, "approximate": c.approximate,
            "val_loss_by_source": c.by_source}


def _sections(curves: list[RunCurve], ratios: list[dict[str, Any]], rows: list[list[Any]],
              differs: list[bool]) -> list[dict[str, Any]]:
    loss = {"title": "Validation loss", "intro": _status(curves), "figures": [], "tables": [],
            "html": []}
    for axis, label in AXES.items():
        approx = [c.name for c in curves if axis in c.approximate]
        note = f" ({', '.join(approx)}: estimated from the config / logged step times)" if approx else ""
        loss["figures"].append({
            "src": F.lines({c.name: c.x[axis] for c in curves}, {c.name: c.loss for c in curves},
                           f"validation loss vs {label}", label, "val loss"),
            "alt": f"val loss vs {axis}",
            "caption": f"Held-out loss of each run against {label}; lower and further left is "
                       f"better{note}."})
    sources = sorted(set().union(*(c.by_source for c in curves)))
    per_source = {"title": "Validation loss per source", "figures": [], "tables": [], "html": [],
                  "intro": "" if sources else "No run logged val/loss/<source> yet."}
    for src in sources:
        have = [c for c in curves if src in c.by_source]
        per_source["figures"].append({
            "src": F.lines({c.name: [t for t, _ in c.by_source[src]] for c in have},
                           {c.name: [v for _, v in c.by_source[src]] for c in have},
                           f"val loss on {src}", "training tokens", "val loss"),
            "alt": f"val loss {src}", "caption": f"Held-out loss on source {src} against "
                                                 "training tokens."})
    reach_sec = {"title": "Tokens, FLOPs and time to reach the other runs' final loss",
                 "figures": [], "html": [], "intro": "", "tables": [{
                     "header": ["run", "reaches final loss of", "target loss", "tokens ratio",
                                "FLOPs ratio", "wall-clock ratio"],
                     "rows": [[r["run"], r["reaches"], f"{r['target_loss']:.4f}",
                               *(_ratio(r[f"{a}_ratio"]) for a in AXES)] for r in ratios],
                     "caption": "Where the run first reaches the other's final validation loss "
                                "(interpolated between evaluations) divided by where the other got "
                                "it; below 1 the run needed less. '-': never reached."}]}
    config = {"title": "Configurations", "figures": [], "html": [],
              "intro": f"{sum(differs)} field(s) differ (highlighted, listed first).",
              "tables": [{"header": ["field"] + [c.name for c in curves], "rows": rows,
                          "diff": differs, "caption": ""}]}
    return [loss, per_source, reach_sec, config]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _status(curves: list[RunCurve]) -> str:
    running = [c.name for c in curves if not c.finished]
    if not running:
        return "All runs finished."
    return f"Still in progress (compared up to their last evaluation): {', '.join(running)}."
