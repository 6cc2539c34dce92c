"""compression_quality: what each cache kind saves in memory and loses in quality.

On the bundled trained models (or any checkpoint folder trained by `kvjax train`), every
measurement reads its text through the cache under test, token by token, exactly as
generation would (`kvjax.evaluate.stream_logits`):

  * memory: cache bytes per cached token, and for a context of `seq_len` tokens;
  * held-out perplexity of the text model (pydoc held-out topics, `ppl_windows` windows
    of `seq_len` tokens), and bits per byte;
  * recall accuracy of the key-value model against the distance between the pair and the
    query (exact match of the whole value, single-query sequences);
  * a long stream (`stream_len` tokens, several times the ring size) of held-out text:
    mean NLL per position block for dense (it fits: one slot per token), window and sinks.

Kinds: dense, int8, window (a ring of W slots) for each W in `windows`, and sinks
(`num_sinks` first tokens + a ring of W) for each W.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import kvjax
from kvjax import data
from kvjax.evaluate import stream_logits, token_nll

from .. import plots
from ..models import check_model, heldout_stream, load_named, recall_task
from ..schema import option


@dataclass(frozen=True)
class Config:
    text_model: str = option("text", help="the text model: any name or path kvjax.load_model takes "
                                          "(bundled or packaged name, .gguf file, checkpoint folder)")
    recall_model: str = option("recall", help="the recall model: 'recall' or a kvjax train checkpoint "
                                              "folder (its train_config.json gives the task); empty: "
                                              "skip the recall measurement")
    windows: tuple[int, ...] = option((32, 64), min=2, min_items=1,
                                      help="ring sizes W for the window and sinks kinds")
    num_sinks: int = option(4, min=1, help="sink tokens kept by the sinks kind")
    int8: bool = option(True, help="include the int8 kind")
    seq_len: int = option(256, min=8, help="tokens per held-out perplexity window")
    ppl_windows: int = option(32, min=1, help="held-out windows scored per kind")
    recall_rows: int = option(32, min=1, help="recall sequences per distance per kind")
    stream_len: int = option(1024, min=16, help="tokens of the long held-out stream")
    stream_rows: int = option(2, min=1, help="long streams scored per kind")
    stream_block: int = option(64, min=1, help="positions averaged per point of the stream plot")


def _kinds(c: Config, context: int):
    """(label, kind, slots, sinks) for every cache under test; dense/int8 hold `context` slots."""
    out = [("dense", "dense", context, None)]
    if c.int8:
        out.append(("int8", "int8", context, None))
    for w in c.windows:
        out.append((f"window {w}", "window", w, None))
        out.append((f"sinks {c.num_sinks}+{w}", "sinks", w + c.num_sinks, c.num_sinks))
    return out


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    check_model("compression_quality.text_model", c.text_model)
    if c.recall_model:
        check_model("compression_quality.recall_model", c.recall_model)
        recall_task("compression_quality.recall_model", c.recall_model)


def _score(cfg, params, tokens, kind, slots, sinks):
    cache = kvjax.init_cache(cfg, tokens.shape[0], slots, kind=kind, num_sinks=sinks)
    logits, _ = stream_logits(cfg, params, tokens, cache)
    return np.asarray(logits)


def run(ctx, c: Config) -> dict:
    headline = {}
    ppl_rows, stream_curves = _text(ctx, c)
    for r in ppl_rows:
        headline[f"ppl_{r['cache'].replace(' ', '_')}"] = r["ppl"]

    # ---- recall model: accuracy by distance
    acc, distances = {}, []
    if c.recall_model:
        distances = _recall(ctx, c, acc)
    else:
        ctx.note("Recall measurement skipped (recall_model is empty).")

    _plot(ctx, c, acc, distances, stream_curves, ppl_rows)
    for label, accs in acc.items():
        headline[f"recall_{label.replace(' ', '_')}"] = float(np.mean(accs))
    return headline


def _text(ctx, c: Config) -> tuple[list[dict], dict]:
    """Text model: memory and held-out perplexity per cache, and NLL along a long stream.
    Returns (one row per cache, {cache label: mean NLL per stream block})."""
    cfg, params, tok = load_named("compression_quality.text_model", c.text_model)
    held = heldout_stream(tok)
    windows = data.text_eval_windows(held, c.seq_len - 1, c.ppl_windows)       # [n, seq_len]
    stream = data.text_eval_windows(held, c.stream_len - 1, c.stream_rows)     # [rows, stream_len]
    ppl_rows, stream_curves = [], {}
    kinds = _kinds(c, c.seq_len)
    with ctx.progress(len(kinds), "text model") as advance:
        for label, kind, slots, sinks in kinds:
            advance(note=label)
            nll = token_nll(_score(cfg, params, windows, kind, slots, sinks), windows)
            per_token = kvjax.cache_bytes(cfg, 1, slots, kind=kind, num_sinks=sinks) / slots
            at_context = kvjax.cache_bytes(cfg, 1, min(slots, c.seq_len) if kind in ("window", "sinks")
                                           else c.seq_len, kind=kind, num_sinks=sinks)
            row = {"model": "text", "cache": label, "kind": kind, "slots": slots,
                   "bytes_per_token": per_token, "cache_bytes_at_seq_len": at_context,
                   "nll": float(nll.mean()), "ppl": float(np.exp(nll.mean())),
                   "bits_per_byte": float(nll.mean() / np.log(2))}
            ctx.log(row)
            ppl_rows.append(row)
            stream_slots = c.stream_len if kind in ("dense", "int8") else slots
            s_nll = token_nll(_score(cfg, params, stream, kind, stream_slots, sinks), stream)
            blocks = s_nll.mean(0)[: (c.stream_len - 1) // c.stream_block * c.stream_block]
            stream_curves[label] = blocks.reshape(-1, c.stream_block).mean(1).tolist()
            ctx.log({"model": "text", "cache": label, "stream_nll_by_block": stream_curves[label]})
    dense_ppl = ppl_rows[0]["ppl"]
    ctx.table(f"Held-out perplexity of the text model ({len(windows)} windows of {c.seq_len} tokens)",
              ["cache", "slots", "bytes/token", "cache bytes @ seq_len", "ppl", "bits/byte", "vs dense"],
              [[r["cache"], r["slots"], r["bytes_per_token"], r["cache_bytes_at_seq_len"], r["ppl"],
                r["bits_per_byte"], f"{100 * (r['ppl'] / dense_ppl - 1):+.2f}%"] for r in ppl_rows])
    return ppl_rows, stream_curves


def _plot(ctx, c: Config, acc: dict, distances, stream_curves: dict, ppl_rows) -> None:
    fig, axes = plots.figure(ncols=3, width=5.0)
    if acc:
        plots.lines(axes[0], distances, acc, xlabel="pair-to-query distance (tokens)",
                    ylabel="exact-match accuracy", title="Recall through the cache")
    else:
        axes[0].text(0.5, 0.5, "recall not measured\n(no recall_model)", ha="center", va="center")
        axes[0].set_axis_off()
    x = [(i + 0.5) * c.stream_block for i in range(len(next(iter(stream_curves.values()))))]
    plots.lines(axes[1], x, stream_curves, xlabel="position in stream", ylabel="NLL (nats/byte)",
                title=f"Long held-out stream ({c.stream_len} tokens)", markers=False)
    axes[2].scatter([r["bytes_per_token"] for r in ppl_rows], [r["ppl"] for r in ppl_rows])
    for r in ppl_rows:
        axes[2].annotate(r["cache"], (r["bytes_per_token"], r["ppl"]), fontsize=7)
    axes[2].set_xlabel("cache bytes per cached token")
    axes[2].set_ylabel("held-out perplexity")
    axes[2].set_title("Memory vs quality", fontsize=10)
    axes[2].grid(True, alpha=0.3)
    ctx.save_figure(fig, "compression_quality.png")


def _recall(ctx, c: Config, acc: dict) -> list[int]:
    """Fill acc[label] with accuracy per distance; returns the distances."""
    rcfg, rparams, _ = load_named("compression_quality.recall_model", c.recall_model)
    task = recall_task("compression_quality.recall_model", c.recall_model)
    distances = task.distances()
    rkinds = _kinds(c, task.seq_len(1))
    with ctx.progress(len(rkinds), "recall model") as advance:
        for label, kind, slots, sinks in rkinds:
            advance(note=label)
            acc[label] = []
            for d in distances:
                batch = data.recall_batch(task, np.random.default_rng(ctx.seed + d), c.recall_rows, distance=d)
                a = data.recall_accuracy(_score(rcfg, rparams, batch.tokens, kind, slots, sinks), batch)
                acc[label].append(a)
                ctx.log({"model": "recall", "cache": label, "distance": d, "accuracy": a})
    # One row per distance (a recall model has dozens), one column per cache.
    labels = list(acc)
    ctx.table(f"Recall accuracy by pair-to-query distance (tokens; {c.recall_rows} sequences each)",
              ["distance"] + labels,
              [[d] + [acc[k][i] for k in labels] for i, d in enumerate(distances)]
              + [["mean"] + [float(np.mean(acc[k])) for k in labels]])
    return distances
