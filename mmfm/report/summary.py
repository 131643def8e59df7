"""Headlines of the reports in a few lines, for the CLI and the demo's closing note: what the
routing report and the comparison found, read from their JSON numbers."""

from __future__ import annotations

from typing import Any


def routing_headlines(numbers: dict[str, Any]) -> list[str]:
    """Dead/hot experts, global MaxVio, the most specialized layer and, per source, the expert
    that leans to it most, from routing.json's numbers."""
    lines = []
    load = numbers.get("heldout_load")
    if load and "maxvio_by_group" in load:  # modality expert groups: balance within each
        worst = {g: max(layer[g] for layer in load["maxvio_by_group"])
                 for g in load["maxvio_by_group"][0]}
        lines.append(f"held-out load at step {load['step']}: worst MaxVio per expert group "
                     f"{', '.join(f'{g} {v:.2f}' for g, v in worst.items())}; "
                     f"{len(load['dead'])} dead and {len(load['hot'])} hot expert(s)")
    elif load:
        worst = max(load["maxvio_global"])
        lines.append(f"held-out load at step {load['step']}: worst global MaxVio {worst:.2f}; "
                     f"{len(load['dead'])} dead and {len(load['hot'])} hot expert(s)")
    lines += _source_lines(numbers.get("specialization_by_source"), "", numbers)
    # Modality expert groups: sources compete for experts only within a group, and over all
    # experts the score mostly says which sources hold images or audio.
    for group, spec in numbers.get("specialization_by_source_within_group", {}).items():
        lines += _source_lines(spec, f" within the {group} experts", numbers)
    sat = numbers.get("saturation")
    if sat and len(sat["steps"]) > 1:
        first = sat["topk"][0]
        by_group = sat.get("random_by_group")
        random = (", ".join(f"{g} {v['topk']:.2f}" for g, v in by_group.items()) if by_group
                  else f"{sat['random_topk']:.2f}")
        lines.append(f"router saturation at step {sat['steps'][0]}: top-k overlap with the final "
                     f"step {', '.join(f'{v:.2f}' for v in first)} (random {random})")
    return lines


def _source_lines(spec: dict[str, Any] | None, where: str, numbers: dict[str, Any]) -> list[str]:
    """The source specialization score per layer and each source's leaning expert."""
    if not spec or len(spec["groups"]) < 2:
        return []
    names = [f"layer_{i:02d}" for i in numbers.get("moe_layers", range(len(spec["score"])))]
    best = max(range(len(spec["score"])), key=lambda p: spec["score"][p])
    return [f"source specialization score{where} per MoE layer: "
            f"{', '.join(f'{s:.3f}' for s in spec['score'])} (1 = own experts per "
            f"source, 0 = none); strongest in {names[best]}"] + _leaning_experts(spec, names)


def _leaning_experts(spec: dict[str, Any], layer_names: list[str]) -> list[str]:
    """Per source: the (layer, expert) whose share of that source's tokens most exceeds its
    mean share over all sources."""
    out = []
    for g, name in enumerate(spec["groups"]):
        best = None
        for p, share_SE in enumerate(spec["share"]):
            for e in range(len(share_SE[g])):
                mean = sum(row[e] for row in share_SE) / len(share_SE)
                lead = share_SE[g][e] - mean
                if best is None or lead > best[0]:
                    best = (lead, p, e, share_SE[g][e])
        if best is not None:
            lead, p, e, share = best
            out.append(f"  {name}: expert {e} of {layer_names[p]} takes {share:.0%} of its tokens "
                       f"({lead:+.0%} over the sources' mean; uniform {_uniform(spec, e)})")
    return out


def _uniform(spec: dict[str, Any], expert: int) -> str:
    """Uniform top-k share of `expert`: k/E, or k/E_group within its modality expert group."""
    if spec.get("uniform") is not None:
        return f"{spec['uniform']:.0%}"
    for name, (first, count) in spec.get("expert_groups", {}).items():
        if first <= expert < first + count:
            return f"{spec['uniform_by_group'][name]:.0%} within the {name} group"
    return "n/a"


def compare_headlines(numbers: dict[str, Any]) -> list[str]:
    """Final losses and the reach ratios, from compare.json's numbers."""
    lines = [f"{run['name']}: final val loss {run['val_loss'][-1]:.4f} after "
             f"{run['tokens'][-1]:.3g} tokens" + ("" if run["finished"] else " (in progress)")
             for run in numbers["runs"]]
    for r in numbers["reach"]:
        if r["tokens_ratio"] is None:
            lines.append(f"{r['run']} never reaches {r['reaches']}'s final loss")
        else:
            lines.append(f"{r['run']} reaches {r['reaches']}'s final loss with "
                         f"{r['tokens_ratio']:.2f}x its tokens, {r['flops_ratio']:.2f}x its FLOPs, "
                         f"{r['wall_s_ratio']:.2f}x its wall time")
    return lines
