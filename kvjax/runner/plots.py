"""Small matplotlib helpers for the result plots (Agg canvas, no pyplot state).

Figures are built with the object API (`matplotlib.figure.Figure`), which renders
through the Agg backend without touching pyplot's global backend, so the runner works
headless and never changes a user's interactive session.
"""
from __future__ import annotations

import io

from matplotlib.figure import Figure


def png_bytes(fig, dpi: int = 110) -> bytes:
    """A Figure as PNG bytes (the results folder's and the report scripts' one encoding)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def figure(ncols: int = 1, width: float = 5.2, height: float = 3.6):
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def lines(ax, x, series: dict, *, xlabel: str, ylabel: str, title: str, logx=False, logy=False,
          markers=True, legend: str | None = "inside"):
    """One line per entry of `series` ({label: y values}) against shared x values.

    More than ten series get twenty colours and alternating markers and line styles (the
    default cycle repeats after ten). legend: "inside", "outside" (right of the axes) or None."""
    many = len(series) > 10
    for i, (label, y) in enumerate(series.items()):
        pts = [(a, b) for a, b in zip(x, y) if b is not None]
        if not pts:
            continue
        style = {}
        if many:
            import matplotlib
            style = dict(color=matplotlib.colormaps["tab20"](i % 20), linestyle=("-", "--", ":")[i % 3])
        ax.plot([a for a, _ in pts], [b for _, b in pts],
                marker=("o", "s", "^", "D", "v")[i % 5 if many else 0] if markers else None,
                markersize=4, label=label, **style)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(series) > 1 and legend == "inside":
        ax.legend(fontsize=8)
    elif len(series) > 1 and legend == "outside":
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def bars(ax, labels, values, *, ylabel: str, title: str):
    ax.bar(labels, values, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(values)])
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.3g}", (i, v), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
