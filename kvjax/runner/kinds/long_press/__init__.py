"""long_press_benchmark: what each cache method costs on real models over long contexts,
kvpress-leaderboard style (issue 21).

Workload: RULER-style tasks generated locally (`kvjax.ruler`: needles, variable tracking,
common words, a copied passage; CPython's documentation as the haystack) at each context
length in `lengths`, `samples` per task, in the model's chat template where it has one.

Protocols (kvpress's): query-agnostic compresses the context, then the question is fed
through the compressed cache; query-aware compresses context + question together (the
question but its last token is inside the press's scoring window), then that last token is
read through the compressed cache (so the answer never comes from the uncompressed chunk). Baselines (which do not look at the query) run the agnostic protocol.

Methods (methods.py): every press in `presses` at every ratio in `ratios`, applied to ONE
shared prefill of each batch (`kvjax.decode.shared`: a press decides what is kept, it does
not change the prefill that scores it); on models with sliding-window layers (Gemma 3) the
presses compact the hybrid cache's full layers and the windowed layers keep their rings
(`hybrid_presses`; AdaKV and KeyRerotation need a full cache); dense; int8; KIVI 2/4-bit;
window and sinks rings of (1 - ratio) of the context; the hybrid cache itself.

DecodingPress on a long generation (decoding.py): on long-answer tasks (`decoding_tasks`,
`passage_copy`: a whole passage written out), dense and DecodingPress(base) for every base in
`decoding_presses` at every ratio (target_size = (1 - ratio) of the context, compacting every
`decoding_interval` generated tokens); the answer teacher-forced through the same compaction
schedule as a greedy generation, and that generation; protocol "decoding" in the rows.

Scores (scoring.py): exact match of the greedy answer (`kvjax.ruler.exact_match`) and the
log-likelihood of the true answer given the cache (teacher-forced), per token; bytes each
method really holds per context; the compile seconds of each press's apply program.

Results: metrics rows per (model, length, task, protocol, method, ratio); per model and
protocol a leaderboard plot (accuracy and answer log-likelihood against compression ratio,
one line per method) and a table of the best method per ratio with its memory.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import jax
import numpy as np

import kvjax
from kvjax import press as P
from kvjax.cache import layer_rings
from kvjax.decode.shared import capture
from kvjax.timing import compile_watch, release_compiled, trim_host_memory

from ... import plots
from ...models import check_model, load_named
from ...schema import ConfigError, option
from ..press_benchmark import SCORERS, WRAPPERS, parse_press
from ..press_benchmark import make_press as _press_from_name
from . import decoding, scoring
from .methods import (BASELINES, Method, as_tokens, bucket, kept_bytes, on_hybrid, press_cache,
                      press_pools, prefilled_baseline, ratio_axis, run_slots, stack)

PROTOCOLS = ("agnostic", "aware")
DEFAULT_PRESSES = ("Knorm", "KeyDiff", "StreamingLLM", "SnapKV", "PyramidKV", "TOVA", "ObservedAttention",
                   "ExpectedAttention", "AdaKV(ExpectedAttention)", "CriticalKV(SnapKV)")


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = option(("smollm2-135m-instruct", "gemma3-270m"), min_items=1,
                                     help="models by kvjax.load_model name (packaged, .gguf, folder, bundled)")
    tasks: tuple[str, ...] = option(("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                     "variable_tracking", "common_words", "passage_qa"), min_items=1,
                                    help="kvjax.ruler task names")
    lengths: tuple[int, ...] = option((1024, 2048, 4096), min=32, min_items=1,
                                      help="context lengths (tokens of the compressed context)")
    samples: int = option(4, min=1, help="samples per (task, length): one batch")
    chat: bool = option(True, help="use the model's chat template where it has one")
    protocols: tuple[str, ...] = option(PROTOCOLS, choices=PROTOCOLS, min_items=1,
                                        help="agnostic: compress, then ask; aware: the question inside the chunk")
    presses: tuple[str, ...] = option(DEFAULT_PRESSES, help=(
        "presses by kvpress name (" + ", ".join(s for s in SCORERS if s != "KVzip") + "); wrappers as "
        "Wrapper(Inner) with Wrapper one of " + ", ".join(WRAPPERS)))
    baselines: tuple[str, ...] = option(BASELINES, choices=BASELINES, help="cache kinds compared with the presses")
    ratios: tuple[float, ...] = option((0.25, 0.5, 0.75, 0.9), min=0.0, max=0.99, min_items=1,
                                       help="compression ratios (share of the context dropped)")
    window_size: int = option(64, min=1, help="SnapKV / PyramidKV window (last queries that score)")
    kernel_size: int = option(5, min=1, help="SnapKV / PyramidKV pooling kernel (odd)")
    n_future_positions: int = option(512, min=1, help="ExpectedAttention: future positions averaged")
    n_sink: int = option(4, min=0, help="StreamingLLM and ExpectedAttention sink tokens")
    chunk_length: int = option(20, min=1, help="ChunkKV chunk length")
    kivi_group_size: int = option(32, min=1, help="KIVI quantisation group (the KIVI paper's 32)")
    kivi_residual_length: int = option(128, min=1, help="KIVI full-precision residual (a multiple of the group)")
    num_sinks: int = option(4, min=1, help="sink tokens of the sinks ring")
    max_new_tokens: int = option(16, min=1, help="greedy answer tokens generated per sample")
    hybrid_presses: bool = option(True, help="on models with sliding-window layers, presses compact the "
                                             "hybrid cache's full layers (the windowed layers keep their "
                                             "rings); false: every layer of a full cache")
    stack_bytes: float = option(2e9, min=1.0, help="most cache bytes scored as one batch: methods with the "
                                                   "same cache layout are stacked along the batch up to this")
    ring_lengths: tuple[int, ...] = option((), min=32, help=(
        "context lengths at which the window and sinks rings run (empty: every length); each ring "
        "size is its own prefill and scoring programs, the slowest baselines to compile"))
    time_budget_s: float = option(0.0, min=0.0, help="stop starting new (model, length) blocks after this "
                                                     "many seconds (0: no limit); what was skipped is reported")
    decoding_presses: tuple[str, ...] = option(("Knorm", "KeyDiff", "StreamingLLM"), choices=decoding.BASES, help=(
        "DecodingPress on a long generation: its base presses (empty: not run); each at every ratio "
        "(target_size = (1 - ratio) of the context), beside dense"))
    decoding_tasks: tuple[str, ...] = option(("passage_copy",), help="long-answer kvjax.ruler tasks the "
                                                                     "DecodingPress rows run on")
    decoding_interval: int = option(32, min=1, help="DecodingPress compression_interval (generated tokens "
                                                    "between compactions)")


def validate(run_cfg) -> None:
    c: Config = run_cfg.settings
    if c.kernel_size % 2 == 0:
        raise ConfigError(f"long_press_benchmark.kernel_size: {c.kernel_size} must be odd")
    if c.kivi_residual_length % c.kivi_group_size:
        raise ConfigError(f"long_press_benchmark.kivi_residual_length: {c.kivi_residual_length} must be a "
                          f"multiple of kivi_group_size={c.kivi_group_size}")
    for key in ("presses", "ratios", "lengths", "tasks", "models", "decoding_presses", "decoding_tasks"):
        v = list(getattr(c, key))
        if len(set(v)) != len(v):
            raise ConfigError(f"long_press_benchmark.{key}: an entry is listed twice: {v}")
    for i, name in enumerate(c.presses):
        try:
            if parse_press(name)[1] == "KVzip":
                raise ValueError("KVzip runs model passes of its own and has no shared-prefill path here")
            _press_from_name(name, 0.5, c)
        except ValueError as e:
            raise ConfigError(f"long_press_benchmark.presses[{i}]: {e}") from None
    from kvjax import ruler
    for key in ("tasks", "decoding_tasks"):
        for i, t in enumerate(getattr(c, key)):
            if t not in ruler.TASKS:
                raise ConfigError(f"long_press_benchmark.{key}[{i}]: unknown task {t!r}; tasks: "
                                  f"{', '.join(ruler.TASKS)}")
    for i, name in enumerate(c.models):
        check_model(f"long_press_benchmark.models[{i}]", name)


def methods(c: Config, cfg, length: int) -> list[Method]:
    """The methods run at a context length: the hybrid cache where a layer's window is shorter
    than the context (`layer_rings`: otherwise no ring exists), the rings at `ring_lengths`."""
    out = [Method("dense", "dense", None)]
    out += [Method(b, b, None) for b in c.baselines if b in ("int8", "kivi2", "kivi4")]
    if "hybrid" in c.baselines and layer_rings(cfg, length):
        out.append(Method("hybrid", "hybrid", None))
    out += [Method(re.sub(r"\s+", "", p), "press", r) for p in c.presses for r in c.ratios]
    if not c.ring_lengths or length in c.ring_lengths:
        out += [Method(b, b, r) for b in c.baselines if b in ("window", "sinks") for r in c.ratios]
    return out


# ----------------------------------------------------------------------------- one batch

@dataclass
class Batch:
    """One (task, length)'s samples as the two protocols see them. The shapes are one per length
    (and protocol), taken over every task of it, so the tasks of a length share every compiled
    program: `context_width` (the padded compressed chunk, both protocols), `room` (cache slots
    after the context), `question_width` (the padded question chunk); the last two per protocol
    (query-aware feeds one question token)."""
    task: str
    length: int
    samples: list
    answers: list
    context_width: int
    room: dict
    question_width: dict
    answer_width: int


def batches(suite: dict, tasks, length: int, max_new_tokens: int) -> list[Batch]:
    """The (task, length) batches of a suite with shapes shared across its tasks."""
    every = [s for t in tasks for s in suite[(t, length)]]
    answers = [s.answer_ids for s in every]
    questions = {"agnostic": [s.question_ids for s in every], "aware": [s.question_ids[-1:] for s in every]}
    shapes = dict(
        context_width=bucket(max(len(s.context_ids) + len(s.question_ids) - 1 for s in every)),
        room={p: scoring.room(q, answers, max_new_tokens) for p, q in questions.items()},
        question_width={p: bucket(max(len(x) for x in q), scoring.BUCKET) for p, q in questions.items()},
        answer_width=bucket(max(len(a) for a in answers), 8))
    return [Batch(t, length, suite[(t, length)], [list(s.answer_ids) for s in suite[(t, length)]], **shapes)
            for t in tasks]


def _protocol_rows(batch: Batch, aware: bool) -> tuple[list, list]:
    """(context rows that are compressed, what is fed after them) of each sample."""
    if aware:   # the question inside the chunk but its last token, which reads the compressed cache
        return ([list(s.context_ids) + list(s.question_ids[:-1]) for s in batch.samples],
                [list(s.question_ids[-1:]) for s in batch.samples])
    return [list(s.context_ids) for s in batch.samples], [list(s.question_ids) for s in batch.samples]


def _groups(c: Config, cfg, ms: list, presses: dict, width: int, room: int, B: int) -> list:
    """Methods whose caches share one layout and shape, so their rows are scored as one batch:
    dense; per ratio, the per-head presses (full or hybrid cache); per ratio, the pooling
    presses; each baseline alone. Every ratio's group of a layout gets the same slot count
    (the largest budget of any ratio: a ratio is data, not a new program), and groups are
    split to stay under `stack_bytes` of cache. Returns [(slots, [Method])]."""
    dense = [m for m in ms if m.family == "dense"]
    out = [(width + room, dense)] if dense else []
    layout = lambda m: (press_pools(presses[(m.name, m.ratio)]),  # noqa: E731
                        on_hybrid(cfg, presses[(m.name, m.ratio)], c.hybrid_presses))
    for key in ((False, False), (False, True), (True, False)):
        mine = [m for m in ms if m.family == "press" and layout(m) == key]
        if not mine:
            continue
        slots = run_slots(cfg, [presses[(m.name, m.ratio)] for m in mine], width, room)
        for ratio in c.ratios:
            group = [m for m in mine if m.ratio == ratio]
            if group:
                out.append((slots, group))
    split = []
    for slots, group in out:
        per = B * P.cache_bytes(cfg, 1, [slots] * cfg.num_layers)
        k = max(1, int(c.stack_bytes // per))
        split += [(slots, group[i:i + k]) for i in range(0, len(group), k)]
    return split + [(None, [m]) for m in ms if m.family not in ("press", "dense")]


def _block(ctx, c: Config, model: str, cfg, params, tok, batch: Batch, ms: list, compiled: dict) -> list:
    """Every method on one batch in every protocol: metric rows."""
    rows = []
    kivi = (c.kivi_group_size, c.kivi_residual_length)
    presses = {(m.name, m.ratio): _press_from_name(m.name, m.ratio, c) for m in ms if m.family == "press"}
    attention = any(p.needs_attention for p in presses.values())
    B = len(batch.samples)
    for protocol in c.protocols:
        aware = protocol == "aware"
        ctx_rows, questions = _protocol_rows(batch, aware)
        tokens, lens = as_tokens(ctx_rows, width=batch.context_width)
        n, width = int(lens.max()), batch.context_width
        room = batch.room[protocol]
        t0 = time.perf_counter()
        with compile_watch() as w:
            pre = jax.block_until_ready(capture(cfg, params, tokens, lens, attention=attention))
        capture_s, capture_compile_s = time.perf_counter() - t0, w.compile_s
        dense_bytes = kept_bytes(cfg, Method("dense", "dense", None), None, n, kivi, c.num_sinks)
        for slots, group in _groups(c, cfg, ms, presses, width, room, B):
            if aware and group[0].family not in ("press", "dense"):
                continue                                        # baselines do not look at the query
            caches, build, build_compile = [], {}, {}
            hybrid = group[0].family == "press" and on_hybrid(cfg, presses[(group[0].name, group[0].ratio)],
                                                              c.hybrid_presses)
            for m in group:
                press = presses.get((m.name, m.ratio))
                t0 = time.perf_counter()
                with compile_watch() as w:
                    if slots is not None:
                        built = press_cache(cfg, pre, press, B, slots, hybrid)
                    else:
                        built = prefilled_baseline(cfg, params, m, tokens, lens, width + room, kivi, c.num_sinks)
                    caches.append(jax.block_until_ready(built))
                build[m], build_compile[m] = time.perf_counter() - t0, w.compile_s
                compiled.setdefault((m.name if m.family == "press" else m.family, protocol), w.compile_s)
            cache = stack(caches)
            caches.clear()          # the stacked copy is all that is scored
            k = len(group)
            t0 = time.perf_counter()
            with compile_watch() as w:
                ll, alen = scoring.answer_loglik(cfg, params, cache, questions * k, batch.answers * k, room,
                                                 batch.answer_width)
                texts = scoring.greedy_answers(cfg, params, tok, cache, questions * k, c.max_new_tokens,
                                               batch.question_width[protocol])
            score_s, score_compile_s = (time.perf_counter() - t0) / k, w.compile_s / k
            for i, m in enumerate(group):
                part = slice(i * B, (i + 1) * B)
                rows.append(_row(c, cfg, model, batch, protocol, m, presses.get((m.name, m.ratio)), hybrid, n,
                                 texts[part], ll[part], alen[part], dense_bytes,
                                 k, build=build[m], score=score_s, capture=capture_s,
                                 compile=build_compile[m] + score_compile_s, capture_compile=capture_compile_s))
                ctx.log(rows[-1])
            del cache
            trim_host_memory()      # freed heap back to the OS between groups (else it ratchets)
    return rows


def _row(c: Config, cfg, model: str, batch: Batch, protocol: str, m: Method, press, hybrid: bool, n: int,
         texts: list, ll, alen, dense_bytes: int, stacked: int, **seconds) -> dict:
    """One metrics row: a method's scores on a batch, its bytes, how many methods were scored
    in its batch (`stacked`) and its timings (`seconds`: name -> s, logged as name_s)."""
    kivi = (c.kivi_group_size, c.kivi_residual_length)
    em = [bool(kvjax.ruler.exact_match(t, s)) for t, s in zip(texts, batch.samples)]
    b = kept_bytes(cfg, m, press, n, kivi, c.num_sinks, hybrid)
    return {"model": model, "length": batch.length, "context_tokens": n, "task": batch.task,
            "protocol": protocol, "method": m.name, "family": m.family, "ratio": m.ratio,
            "cache": "hybrid" if hybrid or m.family == "hybrid" else "full",
            "ratio_axis": ratio_axis(m, b, dense_bytes), "accuracy": float(np.mean(em)),
            "answer_loglik": float(np.mean(ll)),
            "answer_loglik_per_token": float(np.sum(ll) / max(1, int(np.sum(alen)))), "bytes": b,
            "bytes_vs_dense": b / dense_bytes, **{f"{k}_s": v for k, v in seconds.items()},
            "samples": len(em), "stacked": stacked, "rss_gb": _rss_gb(), "maps": _maps(), "example": texts[0][:80]}


def _maps() -> int:
    """Memory mappings of this process (Linux; 0 elsewhere): compiled programs each add some,
    and the kernel caps them (vm.max_map_count)."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _rss_gb() -> float:
    """This process's resident memory now, GB (Linux /proc; 0.0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


# ----------------------------------------------------------------------------- the run

def run(ctx, c: Config) -> dict:
    from kvjax import ruler

    start, rows, skipped, compiled, loaded = time.perf_counter(), [], [], {}, {}
    # memory, not speed, bounds this run: blocks of 1 MB or more are mapped on their own and
    # returned when freed (a 4k-token run was killed at 24 GB resident with far less live)
    trim_host_memory(mmap_threshold=1 << 20)
    for length in c.lengths:                 # length-major: a time budget cuts the longest contexts
        for model in c.models:
            if c.time_budget_s and time.perf_counter() - start > c.time_budget_s:
                skipped.append(f"{model} at {length}")
                continue
            if model not in loaded:
                cfg, params, tok = load_named("long_press_benchmark.models", model)
                chat = c.chat and ruler.has_chat_template(tok)
                loaded[model] = (cfg, params, tok, chat)
                ctx.note(f"{model}: {cfg.num_layers} layers ({sum(cfg.layer_window(l) is not None for l in range(cfg.num_layers))} "
                         f"sliding), {cfg.num_kv_heads} kv heads, head_dim {cfg.head_dim}; "
                         f"{'chat template' if chat else 'plain prompt format'}.")
            cfg, params, tok, chat = loaded[model]
            ms = methods(c, cfg, length)
            suite = ruler.make_suite(tok, c.tasks, [length], c.samples, seed=ctx.seed, chat=chat)
            with ctx.progress(len(c.tasks), f"{model} {length}") as advance:
                for batch in batches(suite, c.tasks, length, c.max_new_tokens):
                    rows += _block(ctx, c, model, cfg, params, tok, batch, ms, compiled)
                    advance(note=batch.task)
            rows += _long_generation(ctx, c, model, cfg, params, tok, chat, length)
            ctx.note(f"{model} at {length} tokens: {len(ms)} methods, done at "
                     f"{time.perf_counter() - start:.0f} s")
            # no program is shared across (model, length) blocks: free them (without this, a
            # full run died twice at Gemma 3 1k after SmolLM2 1k, at the kernel's map limit)
            release_compiled()
    if skipped:
        ctx.note(f"Time budget of {c.time_budget_s:.0f} s reached; not run: {', '.join(skipped)}")
    return _report(ctx, c, rows, compiled, skipped)


def _long_generation(ctx, c: Config, model: str, cfg, params, tok, chat: bool, length: int) -> list:
    """The DecodingPress rows (decoding.py) of every decoding task at one length."""
    if not c.decoding_presses:
        return []
    from kvjax import ruler

    suite = ruler.make_suite(tok, c.decoding_tasks, [length], c.samples, seed=ctx.seed, chat=chat)
    rows = []

    def log(row: dict) -> None:
        row.update(rss_gb=_rss_gb(), maps=_maps())
        ctx.log(row)
    with ctx.progress(len(c.decoding_tasks), f"{model} {length} long generation") as advance:
        for task in c.decoding_tasks:
            rows += decoding.block(c, model, cfg, params, tok, task, length, suite[(task, length)], log)
            trim_host_memory()
            advance(note=task)
    return rows


def summarise(rows: list) -> list[dict]:
    """Mean accuracy and answer log-likelihood per (model, protocol, method, ratio) over tasks
    and lengths, with the mean bytes relative to dense."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["protocol"], r["method"], r["ratio"]), []).append(r)
    out = []
    for (model, protocol, method, ratio), rs in groups.items():
        w = np.array([r["samples"] for r in rs], float)
        out.append({"model": model, "protocol": protocol, "method": method, "ratio": ratio,
                    "family": rs[0]["family"],
                    "ratio_axis": float(np.mean([r["ratio_axis"] for r in rs])),
                    "accuracy": float(np.average([r["accuracy"] for r in rs], weights=w)),
                    "answer_loglik_per_token": float(np.mean([r["answer_loglik_per_token"] for r in rs])),
                    "bytes_vs_dense": float(np.mean([r["bytes_vs_dense"] for r in rs])),
                    "blocks": len(rs)})
    return out


def best_per_ratio(summary: list, ratios=None) -> dict:
    """{ratio: the summary row with the highest answer log-likelihood per token (then accuracy)}
    over the rows of one model and protocol, for `ratios` in their order (default: every ratio
    present, ascending); ratios without rows are left out."""
    present = {s["ratio"] for s in summary if s["ratio"] is not None}
    out = {}
    for ratio in [r for r in ratios if r in present] if ratios is not None else sorted(present):
        out[ratio] = max((s for s in summary if s["ratio"] == ratio),
                         key=lambda s: (s["answer_loglik_per_token"], s["accuracy"]))
    return out


def _report(ctx, c: Config, rows: list, compiled: dict, skipped: list) -> dict:
    if not rows:
        raise RuntimeError("long_press_benchmark measured nothing (every block was skipped)")
    summary = summarise(rows)
    ctx.table("Methods (mean over tasks and lengths)",
              ["model", "protocol", "method", "ratio", "memory vs dense", "accuracy", "answer log-lik / token"],
              [[s["model"], s["protocol"], s["method"], s["ratio"], s["bytes_vs_dense"], s["accuracy"],
                s["answer_loglik_per_token"]] for s in summary])
    decoding.report(ctx, rows)
    ctx.table("Compile seconds of each method's cache program (first batch)",
              ["method", "protocol", "compile s"], [[k[0], k[1], v] for k, v in compiled.items()])
    headline = {"rows": len(rows), "skipped": skipped}
    best = []
    for model in dict.fromkeys(s["model"] for s in summary):
        for protocol in dict.fromkeys(s["protocol"] for s in summary if s["model"] == model):
            mine = [s for s in summary if s["model"] == model and s["protocol"] == protocol]
            leaderboard(ctx, model, protocol, mine)
            dense = next((s for s in mine if s["family"] == "dense"), None)
            if dense:
                headline[f"{model}_{protocol}_dense_accuracy"] = dense["accuracy"]
            for ratio, top in best_per_ratio(mine, c.ratios).items():
                best.append([model, protocol, ratio, top["method"], top["accuracy"],
                             top["answer_loglik_per_token"], top["bytes_vs_dense"]])
                headline[f"{model}_{protocol}_best_at_{ratio}"] = top["method"]
    ctx.table("Best method per ratio (highest answer log-likelihood per token)",
              ["model", "protocol", "ratio", "method", "accuracy", "answer log-lik / token", "memory vs dense"],
              best)
    return headline


def leaderboard(ctx, model: str, protocol: str, summary: list) -> None:
    """kvpress's layout: accuracy and answer log-likelihood against compression ratio, one line
    per method (ratio-free baselines as single points at the memory they save)."""
    fig, (acc, ll) = plots.figure(ncols=2)
    by_method: dict = {}
    for s in summary:
        by_method.setdefault(s["method"], []).append(s)
    xs = sorted({round(s["ratio_axis"], 3) for s in summary})
    for metric, ax, label in (("accuracy", acc, "exact match"), ("answer_loglik_per_token", ll,
                                                                  "answer log-likelihood / token")):
        series = {}
        for method, ss in by_method.items():
            pts = {round(s["ratio_axis"], 3): s[metric] for s in ss}
            series[method] = [pts.get(x) for x in xs]
        title = f"{model}, " + ("a long generation" if protocol == "decoding" else f"query-{protocol}")
        plots.lines(ax, xs, series, xlabel="compression ratio (share of the cache dropped)", ylabel=label,
                    title=title, legend="outside" if ax is ll else None)
    ctx.save_figure(fig, f"leaderboard_{re.sub(r'[^A-Za-z0-9]+', '_', model)}_{protocol}.png")
