"""Small matplotlib helpers for the result plots (Agg canvas, no pyplot state).

Figures are built with the object API (`matplotlib.figure.Figure`), which renders
through the Agg backend without touching pyplot's global backend, so the runner works
headless and never changes a user's interactive session.
"""
from __future__ import annotations

from matplotlib.figure import Figure


def figure(ncols: int = 1, width: float = 5.2, height: float = 3.6):
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def lines(ax, x, series: dict, *, xlabel: str, ylabel: str, title: str, logx=False, logy=False,
          markers=True):
    """One line per entry of `series` ({label: y values}) against shared x values."""
    for label, y in series.items():
        pts = [(a, b) for a, b in zip(x, y) if b is not None]
        if not pts:
            continue
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o" if markers else None,
                markersize=4, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)


def bars(ax, labels, values, *, ylabel: str, title: str):
    ax.bar(labels, values, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(values)])
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.3g}", (i, v), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
