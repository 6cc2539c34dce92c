"""Leaderboards and the best-method table of a long_press_benchmark run from its metrics rows,
also of a run that stopped early (metrics.jsonl.partial: every finished block is there).

    python benchmarks/long_press_report.py RESULTS_DIR [--out DIR] [--prefix NAME]

Writes one leaderboard PNG per (model, protocol) (the kind's own plot: accuracy and answer
log-likelihood against compression ratio, one line per method) and prints, as Markdown, the
best method per ratio (highest answer log-likelihood per token, then accuracy) with its memory
against dense, and what each method covers (lengths, tasks, samples).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvjax.runner.kinds.long_press import best_per_ratio, leaderboard, summarise
from kvjax.runner.plots import png_bytes


class _Figures:
    """The one method of an experiment context `leaderboard` uses: save_figure."""

    def __init__(self, out: Path, prefix: str):
        self.out, self.prefix = out, prefix

    def save_figure(self, fig, name: str) -> Path:
        path = self.out / f"{self.prefix}{name}"
        path.write_bytes(png_bytes(fig))
        return path


def load_rows(results: Path) -> list[dict]:
    for name in ("metrics.jsonl", "metrics.jsonl.partial"):
        if (results / name).exists():
            rows = [json.loads(line) for line in (results / name).read_text().splitlines() if line.strip()]
            return [r for r in rows if "method" in r]
    raise FileNotFoundError(f"no metrics.jsonl(.partial) in {results}")


def best_table(summary: list[dict]) -> list[str]:
    lines = ["| model | protocol | ratio | best method | accuracy | answer log-lik / token | memory vs dense |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = dict.fromkeys((s["model"], s["protocol"]) for s in summary)
    for model, protocol in keys:
        mine = [s for s in summary if s["model"] == model and s["protocol"] == protocol]
        dense = next((s for s in mine if s["family"] == "dense"), None)
        if dense:
            lines.append(f"| {model} | {protocol} | 0 (dense) | dense | {dense['accuracy']:.2f} | "
                         f"{dense['answer_loglik_per_token']:.3f} | 1.00 |")
        for ratio, top in best_per_ratio(mine).items():
            lines.append(f"| {model} | {protocol} | {ratio} | {top['method']} | {top['accuracy']:.2f} | "
                         f"{top['answer_loglik_per_token']:.3f} | {top['bytes_vs_dense']:.2f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the results folder)")
    ap.add_argument("--prefix", default="", help="prefix of the PNG names")
    ap.add_argument("--model", action="append", default=None, help="only this model (repeatable)")
    ap.add_argument("--task", action="append", default=None, help="only this task (repeatable)")
    args = ap.parse_args(argv)
    rows = [r for r in load_rows(args.results) if (not args.model or r["model"] in args.model)
            and (not args.task or r["task"] in args.task)]
    summary = summarise(rows)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out, args.prefix)
    for model, protocol in dict.fromkeys((s["model"], s["protocol"]) for s in summary):
        leaderboard(figs, model, protocol, [s for s in summary if s["model"] == model and s["protocol"] == protocol])
    cover = {}
    for r in rows:
        c = cover.setdefault((r["model"], r["protocol"]), [set(), set(), 0])
        c[0].add(r["length"])
        c[1].add(r["task"])
        c[2] = max(c[2], r["samples"])
    for (model, protocol), (lengths, tasks, n) in cover.items():
        print(f"- {model}, query-{protocol}: lengths {sorted(lengths)}, tasks {sorted(tasks)}, "
              f"{n} samples per task")
    print()
    print("\n".join(best_table(summary)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
