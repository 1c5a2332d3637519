"""Matplotlib helpers shared by the demo's chart and ``bench/plot.py`` (Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path

__all__ = ["pyplot", "grid", "bar_panel", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid(n: int, width: float = 4.6, height: float = 3.6, max_cols: int = 4):
    """A figure of ``n`` panels, at most ``max_cols`` a row; returns ``(fig, [axes])``."""
    plt = pyplot()
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def bar_panel(ax, labels, values, colors, fmt: str, ylabel: str, title: str) -> None:
    """Labelled bars (``fmt`` such as ``"%.2f"``) with a y label and a title.

    Category labels are slanted and value labels small, so that seven bars of a ~4.5-inch
    panel stay readable; the top margin leaves room for the value above the tallest bar."""
    bars = ax.bar(labels, values, color=colors)
    ax.bar_label(bars, fmt=fmt, fontsize=7, padding=2)
    ax.margins(y=0.15)
    ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def save_figure(fig, path: Path, title: str, fontsize: float = 10, dpi: int = 110) -> Path:
    """Give ``fig`` its title, lay it out, write it to ``path`` (PNG) and close it."""
    plt = pyplot()
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
