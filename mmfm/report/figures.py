"""Figures for the reports: matplotlib (Agg) drawings of analysis numbers, as base64 PNG.

Each function takes the numbers an analysis returned and gives a `data:` URI, so the page is
self-contained and opens from disk with no network.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap(matrix, title: str, xlabel: str, ylabel: str, xticks: Sequence | None = None,
            yticks: Sequence | None = None, vmin: float | None = None,
            vmax: float | None = None) -> str:
    """A labelled heatmap with a colour bar."""
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(min(10, 2 + 0.35 * m.shape[1]), min(6, 1.5 + 0.3 * m.shape[0])))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if xticks is not None:
        _ticks(ax.set_xticks, ax.set_xticklabels, xticks)
    if yticks is not None:
        _ticks(ax.set_yticks, ax.set_yticklabels, yticks)
    return to_data_uri(fig)


def _ticks(set_ticks, set_labels, labels: Sequence) -> None:
    step = max(1, len(labels) // 12)
    positions = list(range(0, len(labels), step))
    set_ticks(positions)
    set_labels([str(labels[i]) for i in positions], fontsize=7)


def lines(x_by_name: dict[str, Sequence[float]], y_by_name: dict[str, Sequence[float]],
          title: str, xlabel: str, ylabel: str, baseline: float | None = None,
          baseline_label: str = "random") -> str:
    """One line per name; an optional dashed horizontal baseline."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, ys in y_by_name.items():
        ax.plot(x_by_name[name], ys, marker="o", markersize=3, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label=baseline_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def grouped_bars(values_GB: Sequence[Sequence[float]], groups: Sequence[str],
                 bars: Sequence[str], title: str, ylabel: str,
                 baseline: float | None = None, baseline_label: str = "random") -> str:
    """Bars per group (x) and series (colour), e.g. expert share per source."""
    v = np.asarray(values_GB, dtype=float)
    fig, ax = plt.subplots(figsize=(min(11, 2 + 0.5 * v.shape[1] * max(1, v.shape[0]) / 2), 3.6))
    width = 0.8 / max(1, v.shape[0])
    x = np.arange(v.shape[1])
    for g, name in enumerate(groups):
        ax.bar(x + g * width, v[g], width, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label=baseline_label)
    ax.set_xticks(x + width * (v.shape[0] - 1) / 2)
    ax.set_xticklabels(bars, fontsize=7)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=7)
    return to_data_uri(fig)
