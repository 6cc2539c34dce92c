"""The results folder of one run, written so that a cut-off run never looks complete.

    <out_dir>/<name>/<timestamp>/
      config.yaml     the resolved config (every default filled in)
      env.json        jax/flax/kvjax versions, backend, devices, host, command
      metrics.jsonl   one JSON object per measurement
      metrics.csv     the same rows as a table (columns: union of the rows' keys)
      summary.md      the summary tables and notes (also printed while running)
      summary.json    headline numbers
      *.png           plots
      COMPLETE        written last; its absence means the run did not finish
      FAILED          only when the run raised: the error

Every file is written to `<file>.tmp` and renamed into place (a rename is atomic on
one filesystem), so no file is ever half-written. Metrics stream into
`metrics.jsonl.partial` while the run goes (inspectable, and visibly unfinished) and
are renamed to `metrics.jsonl` only at the end, just before COMPLETE.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import traceback
from pathlib import Path

import numpy as np
import yaml

from ..atomic import atomic_write_bytes, atomic_write_text

COMPLETE = "COMPLETE"
FAILED = "FAILED"
PARTIAL_METRICS = "metrics.jsonl.partial"


def is_complete(path) -> bool:
    """True when the folder holds a finished run (its COMPLETE marker exists)."""
    return (Path(path) / COMPLETE).is_file()


def new_run_dir(root, name: str, now: _dt.datetime | None = None) -> Path:
    """Create and return <root>/<name>/<YYYYmmdd-HHMMSS>[-k]/ (never an existing folder)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        path = parent / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh results folder under {parent}")


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _clean(x):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def dumps(obj, **kw) -> str:
    return json.dumps(_clean(json.loads(json.dumps(obj, default=_jsonable))), **kw)


class ResultsFolder:
    """Writes the files of one run into an existing, empty folder."""

    def __init__(self, path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.blocks: list[tuple] = []  # ("table", title, columns, rows) | ("note", text), in order
        self.plots: list[str] = []
        self._metrics = open(self.path / PARTIAL_METRICS, "a", encoding="utf-8")

    # --------------------------------------------------------------------- atomic files

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write_bytes(self.path / name, data)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, dumps(obj, indent=2) + "\n")

    def write_yaml(self, name: str, obj) -> Path:
        return self.write_text(name, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))

    def save_figure(self, fig, name: str) -> Path:
        """Save a matplotlib Figure as PNG (atomically)."""
        from .plots import png_bytes
        self.plots.append(name)
        return self.write_bytes(name, png_bytes(fig))

    # --------------------------------------------------------------------- content

    def log(self, row: dict) -> None:
        """Record one measurement (streamed to metrics.jsonl.partial immediately)."""
        row = json.loads(dumps(row))
        self.rows.append(row)
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        self.blocks.append(("table", title, list(columns), [list(r) for r in rows]))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    # --------------------------------------------------------------------- finishing

    def finish(self, header: str, headline: dict, wall_s: float) -> None:
        """Write metrics.csv, summary files, metrics.jsonl, then COMPLETE (last)."""
        self._metrics.close()
        self.write_text("metrics.csv", rows_to_csv(self.rows))
        self.write_text("summary.md", self.summary_markdown(header))
        self.write_json("summary.json", headline)
        os.replace(self.path / PARTIAL_METRICS, self.path / "metrics.jsonl")
        finished = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self.write_json(COMPLETE, {"finished": finished, "wall_s": round(wall_s, 3)})

    def fail(self, exc: BaseException) -> None:
        """Record why the run stopped; the folder stays without COMPLETE."""
        try:
            self._metrics.close()
        except Exception:
            pass
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.write_text(FAILED, text)

    def summary_markdown(self, header: str) -> str:
        out = [header, ""]
        for block in self.blocks:
            if block[0] == "note":
                out += [block[1], ""]
                continue
            _, title, columns, rows = block
            out += [f"## {title}", "", "| " + " | ".join(columns) + " |",
                    "|" + "|".join(" --- " for _ in columns) + "|"]
            out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
            out.append("")
        if self.plots:
            out += ["## Plots", ""] + [f"![{p}]({p})" for p in self.plots] + [""]
        return "\n".join(out)


def rows_to_csv(rows: list[dict]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    return buf.getvalue()


def fmt(v) -> str:
    """A table cell: short floats, thousands separators for big integers."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "-"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3g}"
        return f"{v:.2e}"
    return str(v)
