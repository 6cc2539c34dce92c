"""Running one validated experiment into its results folder.

`run_experiment(cfg)` selects the device (an absent platform fails here, before any
folder exists), creates the results folder, writes config.yaml and env.json, runs the
kind inside `jax.default_device(device)` and finishes the folder (metrics, summary,
COMPLETE last). If the kind raises, or the run is interrupted, FAILED records why and
COMPLETE is never written.

Kinds talk to the run only through `Context`: `log` a metrics row, add a `table` or a
`note` (both printed at once and kept for summary.md), `save_figure`, and `track` /
`progress` for long loops.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from . import kinds
from .config import RunConfig
from .env import environment, select_device
from .results import ResultsFolder, fmt, new_run_dir
from .schema import ConfigError


class Context:
    """What a kind's `run(ctx, cfg)` uses to report its work."""

    def __init__(self, cfg: RunConfig, results: ResultsFolder, device, console: Console,
                 err_console: Console, mesh=None):
        self.cfg = cfg
        self.mesh = mesh          # a jax.sharding.Mesh when the config names one
        self.seed = cfg.seed
        self.dtype = cfg.dtype
        self.device = device
        self.results = results
        self.path = results.path
        self.console = console
        self._err = err_console

    def log(self, row: dict) -> None:
        """One measurement: streamed to metrics.jsonl, written to metrics.csv at the end."""
        self.results.log(row)

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        self.results.table(title, columns, rows)
        cells = [[fmt(v) for v in r] for r in rows]
        t = Table(title=title, title_justify="left")
        for i, c in enumerate(columns):
            numeric = any(_numeric(r[i]) for r in rows)
            # Headers may wrap; numbers never get cut.
            t.add_column(c, justify="right" if numeric else "left", overflow="fold",
                         min_width=max((len(r[i]) for r in cells), default=1))
        for r in cells:
            t.add_row(*r)
        self.console.print(t)

    def note(self, text: str) -> None:
        self.results.note(text)
        self.console.print(text, markup=False, highlight=False)

    def save_figure(self, fig, name: str) -> Path:
        return self.results.save_figure(fig, name)

    @contextlib.contextmanager
    def progress(self, total: int, description: str):
        """A progress bar on stderr; yields `advance(n=1, note="")`."""
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=self._err, transient=True) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 1, note: str = ""):
                bar.update(task, advance=n,
                           description=f"{description} {note}".rstrip())
            yield advance

    def track(self, items, description: str):
        """Iterate `items` with a progress bar."""
        items = list(items)
        with self.progress(len(items), description) as advance:
            for x in items:
                yield x
                advance(note=str(x))


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class RunResult:
    path: Path
    headline: dict
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.headline.get("ok", True) is not False


def prepare_folder(cfg: RunConfig, out=None) -> Path:
    if out is None:
        return new_run_dir(cfg.out_dir, cfg.name)
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"--out {str(path)!r} already exists and is not an empty folder; "
                          f"choose a new folder (results of different runs never mix)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_experiment(cfg: RunConfig, out=None, console: Console | None = None,
                   err_console: Console | None = None) -> RunResult:
    """Run a validated config; returns the results folder and headline numbers."""
    device = select_device(cfg.device)
    module = kinds.load(cfg.kind)
    mesh = None
    if cfg.mesh:
        import kvjax
        try:
            mesh = kvjax.make_mesh(cfg.mesh)
        except ValueError as e:
            raise ConfigError(f"mesh: {e}") from None
    if jax.process_index() != 0:
        # Every process runs the experiment (collectives need them all); only process 0
        # keeps a results folder, the others write into a scratch folder removed after.
        import shutil
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="kvjax-run-"))
        try:
            with open(os.devnull, "w") as sink:
                quiet = Console(file=sink)
                return _run(cfg, module, device, mesh, scratch, quiet, quiet)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: wide enough for the tables
            console = Console(width=160)
    err_console = err_console or Console(stderr=True)
    return _run(cfg, module, device, mesh, prepare_folder(cfg, out), console, err_console)


def _run(cfg, module, device, mesh, path, console, err_console) -> RunResult:
    results = ResultsFolder(path)
    results.write_yaml("config.yaml", cfg.to_dict())
    env = environment(device)
    if mesh is not None:
        from kvjax.sharding import describe
        env["mesh"] = describe(mesh)
    results.write_json("env.json", env)
    console.print(f"[bold]{cfg.name}[/bold] ({cfg.kind}) on {device.platform}:{device.device_kind} "
                  f"x{env['device_count']}, jax {jax.__version__} -> {path}")
    start = time.perf_counter()
    try:
        with jax.default_device(device):
            ctx = Context(cfg, results, device, console, err_console, mesh)
            headline = dict(module.run(ctx, cfg.settings) or {})
        wall = time.perf_counter() - start
        headline.setdefault("wall_s", round(wall, 3))
        header = (f"# {cfg.name} ({cfg.kind})\n\n"
                  f"Device: {device.platform} ({device.device_kind}) x{env['device_count']}, "
                  f"host {env['host']['hostname']} ({env['host']['cpus_usable']} usable CPUs), "
                  f"jax {env['versions']['jax']}, flax {env['versions']['flax']}. "
                  f"Started {env['started']}, wall time {wall:.1f} s.")
        results.finish(header, headline, wall)
    except BaseException as e:
        results.fail(e)
        raise
    console.print(f"results: {path} ({wall:.1f} s)")
    return RunResult(path, headline, wall)
